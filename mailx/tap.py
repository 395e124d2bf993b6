"""
``twistd mailx``: command-line options and the service tree.

Everything that can be wrong with the configuration (the TOML itself, the
TLS certificate and key, the aliases file) is checked while the options are
parsed, so a bad start says one clear thing and starts nothing.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Callable
from typing import IO, Any, ClassVar, TypeVar, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    globalLogPublisher,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from mailx import auth
from mailx import local as local_recipients
from mailx.backup import backup_check_from_config
from mailx.config import Config, ConfigError, load_config
from mailx.maillog import MailLogFile, maillog
from mailx.maillog import router as maillog_router
from mailx.outbound import agent_from_config
from mailx.policy import RelayPolicy
from mailx.protocol import ConnectionLimits, ListenerSettings, SMTPServerFactory
from mailx.router import GroupCommit, LocalFirstAgent, LocalStore, Router
from mailx.session import SessionConfig
from mailx.spool import DeliveryAgent, Spool
from mailx.tls import ReloadableContext, TLSConfigError

_T = TypeVar("_T")


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the mailx mail exchanger. Without --config it runs on its embedded "
        "default: SMTP on 127.0.0.1:2525, mail for 'localhost' into var/mailx/."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "Path of the TOML configuration (etc/mailx.toml)."],
    ]

    config: Config
    tls: ReloadableContext | None
    mailboxes: local_recipients.LocalRecipients
    users: auth.Users
    queue_lock: IO[str]

    def postOptions(self) -> None:
        # One line naming the problem, not twistd's usage text: a refused
        # start says what to fix and starts nothing.
        try:
            self._prepare()
        except (ConfigError, auth.UsersFileError) as error:
            raise SystemExit(f"mailx: configuration: {error}") from None
        except TLSConfigError as error:
            raise SystemExit(f"mailx: configuration: tls: {error}") from None

    def _prepare(self) -> None:
        self.config = load_config(self["config"])
        self.mailboxes = local_recipients.LocalRecipients(self.config)
        self.users = auth.load_users(self.config.auth.users_file)
        self.tls = None
        if self.config.tls.enabled:
            self.tls = ReloadableContext(
                self.config.tls.certificate, self.config.tls.key
            )
        if self.config.server.smtps and self.tls is None:
            raise ConfigError(
                "server.smtps: implicit TLS needs tls.certificate and tls.key"
            )
        _check_writable_directory("mailboxes.root", self.config.mailboxes.root)
        _check_writable_directory("queue.directory", self.config.queue.directory)
        control = os.path.dirname(self.config.server.control_socket) or "."
        _check_writable_directory("server.control_socket", control)
        if self.config.log.mail_log:
            _check_writable_file("log.mail_log", self.config.log.mail_log)
        self.queue_lock = _lock_queue(self.config.queue.directory)


def _check_writable_directory(key: str, path: str) -> None:
    """Create ``path`` if missing; it must be a directory mailx can write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{key}: cannot create {path!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path!r} is not writable")


def _check_writable_file(key: str, path: str) -> None:
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot open {path!r}: {error.strerror}") from None


def _lock_queue(directory: str) -> IO[str]:
    """
    Hold a lock on the queue directory for as long as this process runs: two
    servers on one queue would deliver every message twice.
    """
    path = os.path.join(directory, "lock")
    lock = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"queue.directory: {directory!r} is in use by another mailx ({holder})"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


class MailxService(MultiService):
    """The listeners, the spool and the housekeeping around them."""

    def __init__(self, config: Config, tls: ReloadableContext | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.tls = tls
        self.factories: list[SMTPServerFactory] = []
        self._mail_log_file: IO[str] | None = None

    def privilegedStartService(self) -> None:
        # Listeners bind here, before twistd drops privileges.
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            raise SystemExit(
                f"mailx: cannot listen on {error.interface or '*'}:{error.port}:"
                f" {error.socketError}"
            ) from None

    def startService(self) -> None:
        if self.config.log.mail_log:
            self._open_mail_log(self.config.log.mail_log)
        if self.tls is not None:
            signal.signal(signal.SIGHUP, self._on_sighup)
        super().startService()  # type: ignore[no-untyped-call]
        maillog.info(
            "mailx started as {hostname}; local={local} backup={backup}",
            hostname=self.config.server.hostname,
            local=",".join(self.config.domains.local),
            backup=",".join(self.config.domains.backup),
        )

    def stopService(self) -> Deferred[None] | None:
        for factory in self.factories:
            factory.shut_down()
        result = super().stopService()  # type: ignore[no-untyped-call]
        if self._mail_log_file is not None:
            maillog_router.destination = globalLogPublisher
            self._mail_log_file.close()
        return cast("Deferred[None] | None", result)

    def _on_sighup(self, signum: int, frame: object) -> None:
        from twisted.internet import reactor

        cast(IReactorFromThreads, reactor).callFromThread(self._reload_tls)

    def _reload_tls(self) -> None:
        assert self.tls is not None
        try:
            self.tls.reload()
        except TLSConfigError as error:
            maillog.error(
                "TLS reload failed, keeping the old certificate: {error}",
                error=str(error),
            )
            return
        maillog.info("TLS certificate reloaded from {path}", path=self.tls.certificate)

    def _open_mail_log(self, path: str) -> None:
        """Send the mail log to its own file, instead of the twistd log."""
        self._mail_log_file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        maillog_router.destination = MailLogFile(self._mail_log_file)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(
        options.config, options.tls, options.mailboxes, reactor, options.users
    )


def build_service(
    config: Config,
    tls: ReloadableContext | None,
    mailboxes: local_recipients.LocalRecipients,
    reactor: Any,
    users: auth.Users | None = None,
    outbound: DeliveryAgent | None = None,
) -> MailxService:
    """Assemble the whole server; tests call this with their own reactor."""
    service = MailxService(config, tls)
    if users is None:
        users = auth.load_users(config.auth.users_file)

    def run_io(work: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    store = LocalStore(config.mailboxes.root, mailboxes, GroupCommit(run_io))
    if outbound is None:
        outbound = agent_from_config(reactor, config)
    agent = LocalFirstAgent(store, config.domains.local, outbound)
    spool = Spool(
        config.queue.directory,
        reactor,
        agent,
        config.server.hostname,
        min_retry=config.queue.min_retry,
        max_retry=config.queue.max_retry,
        lifetime=config.queue.lifetime,
        delay_warning=config.queue.delay_warning,
        bounce_copy_to=config.queue.bounce_copy_to or None,
        control_socket=config.server.control_socket,
    )
    spool.setServiceParent(service)  # type: ignore[no-untyped-call]
    router = Router(store, spool)
    policy = RelayPolicy(
        config.domains.local,
        config.domains.backup,
        config.relay.networks,
        lambda address: bool(mailboxes.resolve(address)),
        backup_check=backup_check_from_config(config, reactor),
        sender_addresses=users.sender_addresses,
    )
    # auth wiring (issue 3): the authenticator for AUTH PLAIN and LOGIN.
    authenticator = auth.build_authenticator(
        users, reactor, config.limits.max_auth_failures, run_io
    )
    limits = ConnectionLimits(
        config.limits.max_connections, config.limits.max_connections_per_client
    )

    def session_config(require_auth: bool, tls_available: bool) -> SessionConfig:
        return SessionConfig(
            hostname=config.server.hostname,
            max_message_size=config.limits.max_message_size,
            max_recipients=config.limits.max_recipients,
            max_errors=config.limits.max_errors,
            max_hops=config.limits.max_hops,
            tls_available=tls_available,
            require_auth=require_auth,
        )

    listeners = (
        [("smtp", endpoint, False, False) for endpoint in config.server.listen]
        + [
            ("submission", endpoint, True, False)
            for endpoint in config.server.submission
        ]
        + [("smtps", endpoint, True, True) for endpoint in config.server.smtps]
    )

    for name, endpoint, require_auth, implicit_tls in listeners:
        settings = ListenerSettings(
            name=name,
            session=session_config(require_auth, tls is not None and not implicit_tls),
            idle_timeout=config.limits.idle_timeout,
            implicit_tls=implicit_tls,
            tls=tls,
        )
        factory = SMTPServerFactory(
            settings, policy, router, reactor, limits, authenticator
        )
        service.factories.append(factory)
        wrapped: Any = factory
        if implicit_tls:
            assert tls is not None
            wrapped = TLSMemoryBIOFactory(tls, False, factory)
        listener = StreamServerEndpointService(
            serverFromString(reactor, endpoint), wrapped
        )
        # A port that cannot be bound stops the start with its error.
        listener._raiseSynchronously = True
        listener.setServiceParent(service)
    return service
