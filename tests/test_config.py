"""Tests for mailx.config: loading, defaults and every kind of refusal."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path

import pytest

from mailx import config as config_module
from mailx.config import Config, ConfigError, HostPort, is_safe_local_part, load_config

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "mailx.toml"


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mailx.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(str(path))


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return str(caught.value)


def test_default_config() -> None:
    """load_config(None) gives the documented defaults without reading a file."""
    config = load_config(None)

    assert config.server.hostname == "localhost"
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.server.submission == ()
    assert config.server.smtps == ()
    assert config.server.control_socket == "var/mailx/control.sock"
    assert config.domains.local == ("localhost",)
    assert config.domains.backup == ()
    assert config.mailboxes.root == "var/mailx/mail"
    assert config.mailboxes.existing is True
    assert config.mailboxes.aliases == ""
    assert config.limits.max_message_size == 10240000
    assert config.limits.max_recipients == 100
    assert config.limits.idle_timeout == 300
    assert config.limits.max_hops == 50
    assert config.tls.enabled is False
    assert config.relay.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.queue.lifetime == 432000
    assert config.queue.max_retry == 4000
    assert config.delivery.port == 25
    assert config.delivery.smarthost is None
    assert config.delivery.data_end_timeout == 600
    assert dict(config.delivery.tls_policy) == {}
    assert config.backup.verify_recipients == "none"
    assert config.dns.servers == ()
    assert config.dns.timeout == 5
    assert config.log.mail_log == ""


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file means every default, the same as no file."""
    assert load_text(tmp_path, "") == load_config(None)


def test_shipped_example_loads() -> None:
    """The shipped etc/mailx.toml loads and states exactly the defaults."""
    assert load_config(str(SHIPPED)) == load_config(None)


def test_shipped_example_covers_every_key() -> None:
    """The shipped etc/mailx.toml sets every key of every section."""
    with SHIPPED.open("rb") as file:
        shipped = tomllib.load(file)

    for name, (kind, _) in config_module._SECTIONS.items():
        keys = {field.name for field in dataclasses.fields(kind)}
        assert set(shipped.get(name, {})) == keys, name


def test_values_are_read(tmp_path: Path) -> None:
    """Values given in the file replace the defaults, converted to their types."""
    config = load_text(
        tmp_path,
        """
        [server]
        hostname = "MX.Example.COM."
        listen = ["tcp:25", "tcp6:25:interface=\\\\:\\\\:1"]
        [domains]
        local = ["Example.COM.", "example.com", "example.org"]
        backup = ["Example.NET"]
        [mailboxes]
        users = ["Bob", "Alice@EXAMPLE.org"]
        [limits]
        idle_timeout = 60
        [relay]
        networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "2001:db8:1::7"]
        [delivery]
        smarthost = "relay.example.com:587"
        smarthost_user = "me"
        smarthost_password = "secret"
        [delivery.tls_policy]
        "Example.ORG" = "verify"
        [backup]
        verify_recipients = "list"
        recipients = ["Info@Example.NET"]
        [dns]
        servers = ["127.0.0.1:5353", "::1", "[::1]:5354", "192.0.2.1"]
        timeout = 2.5
        """,
    )

    assert config.server.hostname == "MX.Example.COM"
    assert config.server.listen == ("tcp:25", "tcp6:25:interface=\\:\\:1")
    assert config.domains.local == ("example.com", "example.org")
    assert config.domains.backup == ("example.net",)
    assert config.mailboxes.users == ("bob", "alice@example.org")
    assert config.limits.idle_timeout == 60.0
    assert isinstance(config.limits.idle_timeout, float)
    assert config.relay.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8:1::7/128"),
    )
    assert config.delivery.smarthost == HostPort("relay.example.com", 587)
    assert dict(config.delivery.tls_policy) == {"example.org": "verify"}
    assert config.backup.recipients == ("info@example.net",)
    assert config.dns.servers == (
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
        HostPort("::1", 5354),
        HostPort("192.0.2.1", 53),
    )
    assert config.dns.timeout == 2.5


def test_relative_paths_are_kept(tmp_path: Path) -> None:
    """Relative paths are stored as written, not made absolute."""
    config = load_text(
        tmp_path,
        '[mailboxes]\nroot = "mail"\n[queue]\ndirectory = "./q"\n'
        '[server]\ncontrol_socket = "run/ctl"\n[log]\nmail_log = "log/mail.log"\n',
    )

    assert config.mailboxes.root == "mail"
    assert config.queue.directory == "./q"
    assert config.server.control_socket == "run/ctl"
    assert config.log.mail_log == "log/mail.log"


def test_password_is_not_in_repr(tmp_path: Path) -> None:
    """The smarthost password does not appear when the config is printed."""
    config = load_text(
        tmp_path,
        '[delivery]\nsmarthost = "h:25"\nsmarthost_user = "u"\n'
        'smarthost_password = "hunter2-secret"\n',
    )

    assert "hunter2-secret" not in repr(config)


@pytest.mark.parametrize("section", sorted(config_module._SECTIONS))
def test_unknown_key_in_each_section(tmp_path: Path, section: str) -> None:
    """A key a section does not know is refused, naming section and key."""
    message = refusal(tmp_path, f"[{section}]\nbogus = 1\n")

    assert message == f"{section}.bogus: unknown key"


def test_unknown_section(tmp_path: Path) -> None:
    """A section mailx does not know is refused by name."""
    assert refusal(tmp_path, "[smtp]\nport = 25\n") == "smtp: unknown section"


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    """A section name given a plain value is refused."""
    assert refusal(tmp_path, "limits = 5\n") == "limits: must be a table, got 5"


def test_example_message(tmp_path: Path) -> None:
    """A wrong value gives one message: the key, what is wanted, what was found."""
    message = refusal(tmp_path, '[limits]\nmax_message_size = "x"\n')

    assert message == "limits.max_message_size: must be a positive integer, got 'x'"


WRONG_VALUES = [
    ("server", "hostname", "5", "must be a domain name"),
    ("server", "hostname", '"not a host!"', "must be a domain name"),
    ("server", "hostname", '"[127.0.0.1]"', "must be a domain name"),
    ("server", "listen", '"tcp:25"', "must be a list"),
    ("server", "control_socket", '""', "must be a non-empty path"),
    ("domains", "local", '["exa mple.com"]', "must be a domain name"),
    ("domains", "backup", '["-bad.example"]', "must be a domain name"),
    ("domains", "local", "[1]", "must be a domain name"),
    ("mailboxes", "root", "[]", "must be a non-empty path"),
    ("mailboxes", "users", '"bob"', "must be a list"),
    ("mailboxes", "users", "[1]", "must be a string"),
    ("mailboxes", "existing", '"yes"', "must be true or false"),
    ("mailboxes", "existing", "1", "must be true or false"),
    ("limits", "max_recipients", "0", "must be a positive integer"),
    ("limits", "max_recipients", "-5", "must be a positive integer"),
    ("limits", "max_errors", "true", "must be a positive integer"),
    ("limits", "max_hops", "2.5", "must be a positive integer"),
    ("limits", "idle_timeout", "0", "must be a number of seconds > 0"),
    ("limits", "idle_timeout", "false", "must be a number of seconds > 0"),
    ("limits", "idle_timeout", "nan", "must be a number of seconds > 0"),
    ("limits", "idle_timeout", "inf", "must be a number of seconds > 0"),
    ("tls", "certificate", "1", "must be a string"),
    ("relay", "networks", '["10.0.0.0/33"]', "must be a network in CIDR notation"),
    ("relay", "networks", '["fe80::/129"]', "must be a network in CIDR notation"),
    ("relay", "networks", '["example.com"]', "must be a network in CIDR notation"),
    ("relay", "networks", "[24]", "must be a network in CIDR notation"),
    ("relay", "networks", '["127.0.0.0/255.0.0.0"]', "must be a network in CIDR"),
    ("relay", "networks", '["127.0.0.0/0.255.255.255"]', "must be a network in CIDR"),
    ("relay", "networks", '["127.0.0.0/08"]', "must be a network in CIDR notation"),
    ("relay", "networks", '["::1/0128"]', "must be a network in CIDR notation"),
    ("relay", "networks", '["10.0.0.0/+8"]', "must be a network in CIDR notation"),
    ("relay", "networks", '["10.0.0.0/"]', "must be a network in CIDR notation"),
    ("auth", "users_file", "false", "must be a string"),
    ("queue", "min_retry", '"5m"', "must be a number of seconds > 0"),
    # A retry that far would put the next attempt past any time an envelope
    # may hold: the message would be set aside, never tried.
    (
        "queue",
        "min_retry",
        "2e10",
        "must be a number of seconds > 0 and at most 100000000",
    ),
    (
        "queue",
        "max_retry",
        "100000001",
        "must be a number of seconds > 0 and at most 100000000",
    ),
    ("queue", "delay_warning", "-1", "must be a number of seconds >= 0"),
    ("queue", "bounce_copy_to", '"nobody"', "must be an address local@domain"),
    ("delivery", "port", "0", "must be an integer from 1 to 65535"),
    ("delivery", "port", "65536", "must be an integer from 1 to 65535"),
    ("delivery", "smarthost", '"relay.example.com"', "must be 'host:port'"),
    ("delivery", "smarthost", '"relay:99999"', "must be 'host:port'"),
    ("delivery", "smarthost", '"[nope]:25"', "must be 'host:port'"),
    ("delivery", "concurrency", "0", "must be a positive integer"),
    ("delivery", "data_end_timeout", "-600", "must be a number of seconds > 0"),
    ("delivery", "tls_policy", '"verify"', "must be a table"),
    ("backup", "verify_recipients", '"all"', "must be 'none' or 'list' or 'probe'"),
    ("backup", "recipients", '["no-at-sign"]', "must be an address local@domain"),
    ("backup", "probe_cache_ttl", '"1h"', "must be a number of seconds >= 0"),
    ("dns", "servers", '["dns.example.com"]', "must be an IP address"),
    ("dns", "servers", '["127.0.0.1:0"]', "must be an IP address"),
    ("dns", "servers", '["[::1]:x"]', "must be an IP address"),
    ("dns", "timeout", "0", "must be a number of seconds > 0"),
    ("log", "mail_log", "[]", "must be a string"),
]


@pytest.mark.parametrize(("section", "key", "value", "wanted"), WRONG_VALUES)
def test_wrong_values(
    tmp_path: Path, section: str, key: str, value: str, wanted: str
) -> None:
    """A value of the wrong type or out of range is refused, naming its key."""
    message = refusal(tmp_path, f"[{section}]\n{key} = {value}\n")

    assert message.startswith(f"{section}.{key}: {wanted}")
    found = tomllib.loads(f"v = {value}")["v"]
    # A wrong list element is shown by itself.
    shown = found[0] if isinstance(found, list) and found else found
    assert message.endswith(f"got {shown!r}")


@pytest.mark.parametrize(
    ("entry", "network", "host"),
    [
        ("192.168.1.5/24", "192.168.1.0/24", "192.168.1.5/32"),
        ("2001:db8::1/32", "2001:db8::/32", "2001:db8::1/128"),
        ("fe80::1:2/64", "fe80::/64", "fe80::1:2/128"),
    ],
)
def test_relay_network_with_host_bits_is_refused(
    tmp_path: Path, entry: str, network: str, host: str
) -> None:
    """A relay.networks entry with host bits set is refused, naming both readings."""
    message = refusal(tmp_path, f'[relay]\nnetworks = ["10.0.0.0/8", "{entry}"]\n')

    assert message == (
        f"relay.networks: {entry!r} has host bits set; "
        f"write {network} for the network or {host} for one host"
    )


@pytest.mark.parametrize(
    ("entry", "zone", "written"),
    [
        ("fe80::1%eth0/128", "%eth0", "fe80::1/128"),
        ("fe80::1%eth0", "%eth0", "fe80::1"),
        ("fe80::%2/64", "%2", "fe80::/64"),
    ],
)
def test_relay_network_with_a_zone_index_is_refused(
    tmp_path: Path, entry: str, zone: str, written: str
) -> None:
    """A relay.networks entry with a zone index is refused, saying it has no meaning."""
    message = refusal(tmp_path, f'[relay]\nnetworks = ["{entry}"]\n')

    assert message == (
        f"relay.networks: {entry!r} has a zone index ({zone}), which has no "
        "meaning in a network list (a client matches on any interface); "
        f"write {written!r}"
    )


@pytest.mark.parametrize(
    ("entry", "covered"),
    [
        ("0.0.0.0/0", "every IPv4 address"),
        ("::/0", "every IPv6 address"),
        ("10.0.0.1/0", "every IPv4 address"),
        ("::ffff:0.0.0.0/96", "every IPv4 address (as ::ffff:0:0/96)"),
        ("::/80", "every IPv4 address (as ::ffff:0:0/96)"),
    ],
)
def test_relay_network_of_everyone_is_refused(
    tmp_path: Path, entry: str, covered: str
) -> None:
    """An entry covering all of IPv4 or of IPv6 is refused as an open relay."""
    message = refusal(tmp_path, f'[relay]\nnetworks = ["127.0.0.0/8", "{entry}"]\n')

    assert message == (
        f"relay.networks: {entry!r} covers {covered}, which would make mailx "
        "an open relay; list the networks of the clients that may relay "
        "instead, such as '192.0.2.0/24'"
    )


@pytest.mark.parametrize(
    ("entries", "family"),
    [
        ('"0.0.0.0/1", "128.0.0.0/1"', "IPv4"),
        ('"0.0.0.0/1", "::ffff:128.0.0.0/97"', "IPv4"),
        ('"::ffff:0.0.0.0/97", "::ffff:128.0.0.0/97"', "IPv4"),
    ],
)
def test_relay_networks_that_together_cover_everyone_are_refused(
    tmp_path: Path, entries: str, family: str
) -> None:
    """Entries that each cover part of a family but together all of it are
    refused as an open relay too."""
    message = refusal(tmp_path, f"[relay]\nnetworks = [{entries}]\n")

    assert message == (
        f"relay.networks: the entries together cover every {family} address,"
        " which would make mailx an open relay; list the networks of the"
        " clients that may relay instead, such as '192.0.2.0/24'"
    )


def test_ipv6_networks_that_together_cover_everyone_are_refused(
    tmp_path: Path,
) -> None:
    """All of IPv6 in pieces, none of which covers the IPv4-mapped range
    alone, is refused as an open relay."""
    everything = ipaddress.IPv6Network("::/0")
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    pieces = [*everything.address_exclude(mapped), *mapped.subnets(prefixlen_diff=1)]
    entries = ", ".join(f'"{piece}"' for piece in pieces)
    message = refusal(tmp_path, f"[relay]\nnetworks = [{entries}]\n")

    assert message.startswith(
        "relay.networks: the entries together cover every IPv4 address"
    )


def test_relay_networks_that_leave_some_out_are_taken(tmp_path: Path) -> None:
    """Two halves less one address are not everyone: the list loads."""
    path = tmp_path / "mailx.toml"
    path.write_text('[relay]\nnetworks = ["0.0.0.0/1", "128.0.0.0/2", "::1"]\n')
    assert len(load_config(str(path)).relay.networks) == 3


def test_relay_network_refusal_says_what_is_wanted(tmp_path: Path) -> None:
    """A netmask or a zero-padded length is refused, saying to write the length."""
    message = refusal(tmp_path, '[relay]\nnetworks = ["127.0.0.0/255.0.0.0"]\n')

    assert message == (
        "relay.networks: must be a network in CIDR notation, an address or "
        "address/prefix-length with the length in decimal without leading "
        "zeros, such as '192.0.2.0/24', got '127.0.0.0/255.0.0.0'"
    )


def test_ints_are_accepted_for_seconds(tmp_path: Path) -> None:
    """An integer is a valid duration and is stored as a float."""
    config = load_text(tmp_path, "[delivery]\nconnect_timeout = 7\n")

    assert config.delivery.connect_timeout == 7.0
    assert isinstance(config.delivery.connect_timeout, float)


def test_delay_warning_zero_disables(tmp_path: Path) -> None:
    """queue.delay_warning accepts 0, meaning no warning."""
    config = load_text(tmp_path, "[queue]\ndelay_warning = 0\n")

    assert config.queue.delay_warning == 0


@pytest.mark.parametrize(
    "endpoint", ["nonsense:25", "tcp:port", "tcp:25:colour=blue", "tcp", ""]
)
@pytest.mark.parametrize("key", ["listen", "submission", "smtps"])
def test_bad_endpoint(tmp_path: Path, key: str, endpoint: str) -> None:
    """An endpoint string Twisted cannot parse is refused, naming the key."""
    message = refusal(tmp_path, f'[server]\n{key} = ["tcp:25", "{endpoint}"]\n')

    assert message.startswith(f"server.{key}: must be a Twisted endpoint string")
    assert repr(endpoint) in message


def test_no_listener_at_all(tmp_path: Path) -> None:
    """A server with no listener of any kind is refused."""
    message = refusal(tmp_path, "[server]\nlisten = []\n")

    assert message.startswith("server.listen: at least one of")


def test_tls_policy_bad_level(tmp_path: Path) -> None:
    """A TLS policy other than 'may' or 'verify' is refused, naming the domain."""
    message = refusal(tmp_path, '[delivery.tls_policy]\n"example.com" = "must"\n')

    assert message == (
        "delivery.tls_policy.example.com: must be 'may' or 'verify', got 'must'"
    )


def test_tls_policy_bad_domain(tmp_path: Path) -> None:
    """A TLS policy for something that is not a domain name is refused."""
    message = refusal(tmp_path, '[delivery.tls_policy]\n"a b" = "may"\n')

    assert message.startswith("delivery.tls_policy.a b: must be a domain name")


def test_domain_both_local_and_backup(tmp_path: Path) -> None:
    """A domain listed as both local and backup is refused."""
    message = refusal(
        tmp_path, '[domains]\nlocal = ["example.com"]\nbackup = ["EXAMPLE.com."]\n'
    )

    assert message.startswith("domains.backup: 'example.com' is also in domains.local")


def test_no_local_domain(tmp_path: Path) -> None:
    """At least one local domain is required, for postmaster."""
    message = refusal(tmp_path, "[domains]\nlocal = []\n")

    assert message == "domains.local: must name at least one domain"


@pytest.mark.parametrize(
    "entry", ["bob@example.org", "../bob", ".hidden", "a/b", "@localhost", "bob@"]
)
def test_bad_users_entry(tmp_path: Path, entry: str) -> None:
    """A users entry outside local domains or unsafe on disk is refused."""
    message = refusal(tmp_path, f'[mailboxes]\nusers = ["{entry}"]\n')

    assert message.startswith("mailboxes.users: must be ")
    assert repr(entry) in message


def test_backup_recipient_outside_backup_domains(tmp_path: Path) -> None:
    """A backup recipient must be in a backup domain."""
    message = refusal(
        tmp_path,
        '[domains]\nbackup = ["example.net"]\n'
        '[backup]\nrecipients = ["info@example.org"]\n',
    )

    assert message == (
        "backup.recipients: must be addresses in domains.backup, got 'info@example.org'"
    )


def test_backup_list_needs_recipients(tmp_path: Path) -> None:
    """verify_recipients = 'list' with no recipients is refused."""
    message = refusal(tmp_path, '[backup]\nverify_recipients = "list"\n')

    assert message.startswith("backup.recipients: must not be empty")


def test_retry_bounds(tmp_path: Path) -> None:
    """queue.max_retry below queue.min_retry is refused."""
    message = refusal(tmp_path, "[queue]\nmin_retry = 600\nmax_retry = 60\n")

    assert message == "queue.max_retry: must be >= queue.min_retry (600), got 60"


def test_smarthost_credentials(tmp_path: Path) -> None:
    """Smarthost credentials need a smarthost and both halves."""
    without_host = refusal(
        tmp_path, '[delivery]\nsmarthost_user = "u"\nsmarthost_password = "p"\n'
    )
    half = refusal(tmp_path, '[delivery]\nsmarthost = "h:25"\nsmarthost_user = "u"\n')

    assert without_host == "delivery.smarthost_user: needs delivery.smarthost"
    assert half.startswith("delivery.smarthost_password: ")


def test_smarthost_ipv6(tmp_path: Path) -> None:
    """An IPv6 smarthost is written in brackets with its port."""
    config = load_text(tmp_path, '[delivery]\nsmarthost = "[::1]:2526"\n')

    assert config.delivery.smarthost == HostPort("::1", 2526)


def make_files(tmp_path: Path) -> tuple[Path, Path]:
    certificate = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    certificate.write_text("certificate\n")
    key.write_text("key\n")
    return certificate, key


def test_tls_both_set(tmp_path: Path) -> None:
    """With both TLS files readable, TLS is enabled and the paths are kept."""
    certificate, key = make_files(tmp_path)

    config = load_text(
        tmp_path, f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'
    )

    assert config.tls.enabled
    assert config.tls.certificate == str(certificate)
    assert config.tls.key == str(key)


@pytest.mark.parametrize("given", ["certificate", "key"])
def test_tls_half_set(tmp_path: Path, given: str) -> None:
    """Only one of tls.certificate and tls.key is refused, naming the missing one."""
    certificate, _ = make_files(tmp_path)
    missing = "key" if given == "certificate" else "certificate"

    message = refusal(tmp_path, f'[tls]\n{given} = "{certificate}"\n')

    assert message == (
        f"tls.{missing}: tls.certificate and tls.key must be set together"
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("tls", "certificate"),
        ("tls", "key"),
        ("mailboxes", "aliases"),
        ("auth", "users_file"),
    ],
)
def test_missing_files(tmp_path: Path, section: str, key: str) -> None:
    """A file that does not exist, or is a directory, is refused at load time."""
    absent = tmp_path / "absent.pem"

    message = refusal(tmp_path, f'[{section}]\n{key} = "{absent}"\n')
    directory = refusal(tmp_path, f'[{section}]\n{key} = "{tmp_path}"\n')

    assert message == (
        f"{section}.{key}: must be a readable file or an empty string, "
        f"got {str(absent)!r}"
    )
    assert directory.startswith(f"{section}.{key}: must be a readable file")


def test_smtps_needs_tls(tmp_path: Path) -> None:
    """Implicit-TLS listeners without a certificate are refused."""
    message = refusal(tmp_path, '[server]\nsmtps = ["tcp:4465"]\n')

    assert message.startswith("server.smtps: implicit-TLS listeners need tls.")


def test_submission_needs_tls_and_users(tmp_path: Path) -> None:
    """Submission listeners need TLS and an AUTH users file."""
    certificate, key = make_files(tmp_path)
    users = tmp_path / "users"
    users.write_text("")
    tls = f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'
    server = '[server]\nsubmission = ["tcp:4587:interface=127.0.0.1"]\n'

    without_tls = refusal(tmp_path, server)
    without_users = refusal(tmp_path, server + tls)
    config = load_text(tmp_path, f'{server}{tls}[auth]\nusers_file = "{users}"\n')

    assert without_tls.startswith("server.submission: submission listeners need tls")
    assert without_users == (
        "server.submission: submission listeners need auth.users_file"
    )
    assert config.server.submission == ("tcp:4587:interface=127.0.0.1",)


def test_not_toml(tmp_path: Path) -> None:
    """A file that is not TOML is refused, naming the file."""
    path = tmp_path / "mailx.toml"
    path.write_text("[server\n")

    with pytest.raises(ConfigError, match=r"mailx\.toml: not valid TOML"):
        load_config(str(path))


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused, naming the file."""
    path = tmp_path / "mailx.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')

    with pytest.raises(ConfigError, match=r"mailx\.toml: not valid TOML"):
        load_config(str(path))


def test_missing_config_file(tmp_path: Path) -> None:
    """A configuration file that does not exist is refused, naming the file."""
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(str(path))

    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_every_field_has_a_checker() -> None:
    """Every dataclass field of every section can be set from the file."""
    for name, (kind, checkers) in config_module._SECTIONS.items():
        assert {f.name for f in dataclasses.fields(kind)} == set(checkers), name


@pytest.mark.parametrize(
    ("local_part", "safe"),
    [
        ("bob", True),
        ("bob.smith", True),
        ("b+tag", True),
        ("", False),
        (".", False),
        ("..", False),
        ("../etc", False),
        ("a/b", False),
        ("a..b", False),
        (".profile", False),
        ("nul\x00", False),
        ("line\nbreak", False),
    ],
)
def test_is_safe_local_part(local_part: str, safe: bool) -> None:
    """Only local parts that stay one directory below their domain are safe."""
    assert is_safe_local_part(local_part) is safe
