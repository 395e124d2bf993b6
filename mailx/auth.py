"""
AUTH credentials (RFC 4954): the users file, scrypt password hashes, a
``twisted.cred`` portal, and the ``Authenticator`` the SMTP session asks.

Theory of operation
-------------------
``load_users`` reads the users file once, at start-up.  Each line is::

    user:scrypt-hash:address1,address2

The addresses are the reverse paths the user may send from (``@domain``
allows the whole domain); none means any (``mailx.policy`` enforces them).
A password hash is the text ``scrypt$N$r$p$salt$key`` (RFC 7914 parameters,
salt and derived key in padded base64), which ``python -m mailx.auth hash``
prints for a password read from standard input.

``PortalAuthenticator.authenticate`` waits first if the client's address has
failed recently (``FailureThrottle``: a delay that doubles with each failure,
and a refusal of every attempt once ``max_failures`` is reached), then logs in
through a ``twisted.cred`` portal whose checker hashes the password in a
thread, so the reactor never waits for scrypt.  It fires with the user name,
or None when refused.  Neither passwords nor the user names of failed
attempts are ever logged: a user name field often holds a mistyped password.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailx.address import AddressError, parse_domain, parse_mailbox
from mailx.clients import client_key
from mailx.envelope import ClientInfo
from mailx.files import read_regular_file
from mailx.maillog import PrintableLogger, maillog

log = PrintableLogger()

RunBlocking = Callable[[Callable[[], bool]], Deferred[bool]]

# RFC 7914 section 2 cites N=16384, r=8, p=1 as the interactive-login cost
# (about 50 ms and 16 MiB here).
DEFAULT_N = 16384
DEFAULT_R = 8
DEFAULT_P = 1
# NIST SP 800-132 section 5.1: a salt of at least 128 bits.
SALT_BYTES = 16
KEY_BYTES = 32
# Bounds on what a users file may ask for, so a typing mistake cannot make
# each AUTH take a gigabyte: 128 * r * N octets of memory at most 128 MiB.
MAX_MEMORY = 128 * 1024 * 1024
MAX_P = 16
MIN_SALT_BYTES = 8
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64

# Failure slow-down (our choice, in the range of Dovecot's 2 s
# auth_failure_delay): 1 s after the first failure of an address, doubling up
# to 30 s, forgotten 15 minutes after its last failure; at most 10000
# addresses remembered, the oldest dropped first.
BASE_DELAY = 1.0
MAX_DELAY = 30.0
FAILURE_MEMORY = 900.0
MAX_TRACKED = 10000


class UsersFileError(Exception):
    """The users file cannot be used; the message names the file and line."""


class PasswordHashError(ValueError):
    """A password hash string that is not ``scrypt$N$r$p$salt$key``."""


def prepare_password(password: str) -> bytes:
    """The octets that are hashed for ``password``."""
    # RFC 8265 section 4.2 (OpaqueString): non-ASCII spaces become U+0020,
    # then Unicode NFC, so the same password typed on two systems matches.
    mapped = "".join(
        " " if unicodedata.category(char) == "Zs" else char for char in password
    )
    return unicodedata.normalize("NFC", mapped).encode("utf-8")


@dataclass(frozen=True)
class PasswordHash:
    """An scrypt hash with its parameters (RFC 7914)."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        fields = text.split("$")
        if len(fields) != 6 or fields[0] != "scrypt":
            raise PasswordHashError("not of the form scrypt$N$r$p$salt$key")
        try:
            if not all(number.isascii() and number.isdigit() for number in fields[1:4]):
                raise ValueError(text)
            n, r, p = (int(number, 10) for number in fields[1:4])
            salt = base64.b64decode(fields[4], validate=True)
            key = base64.b64decode(fields[5], validate=True)
        except (ValueError, binascii.Error):
            raise PasswordHashError(
                "N, r and p must be numbers and salt and key base64"
            ) from None
        password_hash = cls(n, r, p, salt, key)
        password_hash.check_bounds()
        return password_hash

    def check_bounds(self) -> None:
        # RFC 7914 section 2: N is a power of two greater than 1.
        if self.n < 2 or self.n & (self.n - 1):
            raise PasswordHashError("N must be a power of two greater than 1")
        if self.r < 1 or self.p < 1 or self.p > MAX_P:
            raise PasswordHashError(f"r must be >= 1 and p within 1 to {MAX_P}")
        if 128 * self.r * self.n > MAX_MEMORY:
            raise PasswordHashError("128 * r * N must be at most 128 MiB")
        if len(self.salt) < MIN_SALT_BYTES:
            raise PasswordHashError(f"the salt must be {MIN_SALT_BYTES}+ octets")
        if not MIN_KEY_BYTES <= len(self.key) <= MAX_KEY_BYTES:
            raise PasswordHashError(
                f"the key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} octets"
            )

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"scrypt${self.n}${self.r}${self.p}${salt}${key}"

    def derive(self, password: str) -> bytes:
        """The scrypt key of ``password`` with this hash's salt and cost."""
        return hashlib.scrypt(
            prepare_password(password),
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            # What OpenSSL needs for these parameters, with room to spare.
            maxmem=128 * self.r * (self.n + self.p + 2) + 1024 * 1024,
            dklen=len(self.key),
        )

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)


def hash_password(
    password: str,
    salt: bytes | None = None,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
) -> str:
    """A new hash string for ``password``, with a random salt unless given."""
    template = PasswordHash(
        n, r, p, os.urandom(SALT_BYTES) if salt is None else salt, bytes(KEY_BYTES)
    )
    template.check_bounds()
    key = template.derive(password)
    return str(PasswordHash(n, r, p, template.salt, key))


@dataclass(frozen=True)
class User:
    """One line of the users file."""

    name: str
    password_hash: PasswordHash
    # Reverse paths the user may send from; empty means any.
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Users:
    """The users of the users file, by AUTH user name."""

    users: Mapping[str, User] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    def get(self, name: str) -> User | None:
        return self.users.get(name)

    @property
    def sender_addresses(self) -> dict[str, tuple[str, ...]]:
        """Users limited to some reverse paths, for ``mailx.policy``."""
        return {
            name: user.addresses for name, user in self.users.items() if user.addresses
        }


def parse_users(text: str, source: str = "users file") -> Users:
    """Read users file text; raise UsersFileError naming ``source`` and line."""
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source}: line {number}"
        # The line itself is never quoted back: it holds a password hash.
        user = _parse_user_line(line, where)
        if user.name in users:
            raise UsersFileError(f"{where}: user {user.name!r} appears twice")
        users[user.name] = user
    return Users(users)


def _parse_user_line(line: str, where: str) -> User:
    fields = line.split(":")
    if len(fields) not in (2, 3):
        raise UsersFileError(f"{where}: expected user:scrypt-hash:addresses")
    name, hash_text = fields[0], fields[1].strip()
    if not name or name != name.strip() or not name.isprintable():
        raise UsersFileError(
            f"{where}: the user name must be printable without outer spaces"
        )
    try:
        password_hash = PasswordHash.parse(hash_text)
    except PasswordHashError as error:
        raise UsersFileError(f"{where}: bad password hash: {error}") from None
    addresses = fields[2].split(",") if len(fields) == 3 else []
    checked = tuple(
        _sender_address(address.strip(), where)
        for address in addresses
        if address.strip()
    )
    return User(name, password_hash, checked)


def _sender_address(text: str, where: str) -> str:
    """``local@domain`` or ``@domain``, lower-cased; UTF-8 allowed."""
    try:
        if text.startswith("@"):
            parse_domain(text[1:], utf8=True)
        else:
            parse_mailbox(text, utf8=True)
    except AddressError:
        raise UsersFileError(
            f"{where}: {text!r} is not an address local@domain or @domain"
        ) from None
    return text.lower()


def load_users(path: str) -> Users:
    """Read the users file at ``path``; "" means no users."""
    if not path:
        return Users()
    try:
        text = read_regular_file(path).decode("utf-8")
    except OSError as error:
        raise UsersFileError(
            f"auth.users_file: cannot read {path!r}: {error.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise UsersFileError(f"auth.users_file: {path!r} is not UTF-8") from None
    return parse_users(text, f"auth.users_file {path!r}")


# --- twisted.cred ---------------------------------------------------------------


class ISubmitter(Interface):
    """An authenticated user of the submission service."""

    name = Attribute("The AUTH user name, as in the users file.")


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    name: str


@implementer(IRealm)
class SubmissionRealm:
    """Gives each authenticated user name its ``Submitter``."""

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Callable[[], None]]:
        if ISubmitter not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("only ISubmitter avatars of users")
        return ISubmitter, Submitter(avatarId.decode("utf-8")), _no_logout


def _no_logout() -> None:
    """A submitter holds nothing that needs releasing."""


@implementer(ICredentialsChecker)
class UsersChecker:
    """Checks user names and passwords against ``Users``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Users, run_blocking: RunBlocking) -> None:
        self.users = users
        self.run_blocking = run_blocking
        # Unknown users are hashed too, so the answer takes as long.
        self._stand_in = PasswordHash(
            DEFAULT_N, DEFAULT_R, DEFAULT_P, bytes(SALT_BYTES), bytes(KEY_BYTES)
        )

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        if not IUsernamePassword.providedBy(credentials):
            return fail(UnauthorizedLogin())
        try:
            name = credentials.username.decode("utf-8")
            password = credentials.password.decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin())
        user = self.users.get(name)
        password_hash = self._stand_in if user is None else user.password_hash

        def check() -> bool:
            return password_hash.matches(password) and user is not None

        def decided(matched: bool) -> bytes | tuple[()]:
            if not matched:
                raise UnauthorizedLogin()
            return name.encode("utf-8")

        return self.run_blocking(check).addCallback(decided)


def make_portal(users: Users, run_blocking: RunBlocking) -> Portal:
    return Portal(SubmissionRealm(), [UsersChecker(users, run_blocking)])


# --- the session's Authenticator --------------------------------------------------


@dataclass
class _Failures:
    count: int
    last: float


class FailureThrottle:
    """Failed AUTH attempts per client, and how long the next one waits."""

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        memory: float = FAILURE_MEMORY,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.memory = memory
        self.max_tracked = max_tracked
        # Insertion order is the order of last failure: oldest first.
        self._failures: dict[str, _Failures] = {}

    def failures(self, key: str) -> int:
        self._forget_old()
        entry = self._failures.get(key)
        return 0 if entry is None else entry.count

    def delay(self, key: str) -> float:
        """Seconds the next attempt from ``key`` waits before it is checked."""
        count = self.failures(key)
        if count == 0:
            return 0.0
        return float(min(self.base_delay * 2 ** min(count - 1, 32), self.max_delay))

    def locked_out(self, key: str) -> bool:
        return self.failures(key) >= self.max_failures

    def record_failure(self, key: str) -> int:
        """Count one more failure of ``key``; return its count."""
        self._forget_old()
        entry = self._failures.pop(key, None)
        count = 1 if entry is None else entry.count + 1
        self._failures[key] = _Failures(count, self.clock.seconds())
        while len(self._failures) > self.max_tracked:
            del self._failures[next(iter(self._failures))]
        return count

    def _forget_old(self) -> None:
        horizon = self.clock.seconds() - self.memory
        while self._failures:
            key, entry = next(iter(self._failures.items()))
            if entry.last > horizon:
                break
            del self._failures[key]


class PortalAuthenticator:
    """The ``mailx.session.Authenticator`` of mailx: a portal and a throttle."""

    def __init__(self, portal: Portal, throttle: FailureThrottle) -> None:
        self.portal = portal
        self.throttle = throttle

    def replace_users(self, users: Users) -> None:
        """Check passwords against ``users`` from now on (a reloaded file)."""
        for checker in self.portal.checkers.values():
            if isinstance(checker, UsersChecker):
                checker.users = users

    def authenticate(
        self, client: ClientInfo, user: str, password: str
    ) -> Deferred[str | None]:
        key = client_key(client.address)
        delay = self.throttle.delay(key)
        waited: Deferred[None]
        if delay:
            log.debug(
                "auth from [{client_address}] waits {delay}s after failures",
                client_address=client.address,
                delay=delay,
            )
            waited = deferLater(self.throttle.clock, delay)
        else:
            waited = succeed(None)
        return waited.addCallback(lambda _: self._check(client, key, user, password))

    def _check(
        self, client: ClientInfo, key: str, user: str, password: str
    ) -> Deferred[str | None]:
        # Checked after the wait, so attempts made in parallel are refused
        # as soon as the failures they made reach the limit.
        if self.throttle.locked_out(key):
            maillog.info(
                "auth refused from [{client_address}]: too many failures",
                client_address=client.address,
            )
            return succeed(None)
        credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        login = self.portal.login(credentials, None, ISubmitter)

        def logged_in(
            result: tuple[type[Interface], object, Callable[[], None]],
        ) -> str:
            _, avatar, logout = result
            logout()
            assert isinstance(avatar, Submitter)
            return avatar.name

        def refused(failure: Failure) -> Failure | None:
            if not isinstance(failure.value, UnauthorizedLogin):
                return failure
            count = self.throttle.record_failure(key)
            if count == self.throttle.max_failures:
                maillog.info(
                    "auth failures from [{client_address}] reached {count}; "
                    "refusing its AUTH for {memory:g}s",
                    client_address=client.address,
                    count=count,
                    memory=self.throttle.memory,
                )
            return None

        return login.addCallbacks(logged_in, refused)


def build_authenticator(
    users: Users,
    clock: IReactorTime,
    max_failures: int,
    run_blocking: RunBlocking,
) -> PortalAuthenticator | None:
    """The authenticator for ``users``, or None (no AUTH) when there are none."""
    if not len(users):
        return None
    throttle = FailureThrottle(clock, max_failures)
    return PortalAuthenticator(make_portal(users, run_blocking), throttle)


# --- python -m mailx.auth hash ----------------------------------------------------

USAGE = """\
usage: python -m mailx.auth hash

Reads a password from standard input (one line; asked for without echo on a
terminal) and prints its scrypt hash string for the users file.
"""


def main(argv: Sequence[str], stdin: Any = None, stdout: Any = None) -> int:
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if list(argv) != ["hash"]:
        sys.stderr.write(USAGE)
        return 2
    if stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        sys.stderr.write("mailx.auth: an empty password is not allowed\n")
        return 1
    stdout.write(hash_password(password) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
