"""
``twistd mailx``: command-line options and the service tree.

Everything that can be wrong with the configuration (the TOML itself, the
TLS certificate and key, the aliases file) is checked while the options are
parsed, so a bad start says one clear thing and starts nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import IO, Any, ClassVar, TypeVar, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from mailx import auth
from mailx import local as local_recipients
from mailx.backup import backup_check_from_config
from mailx.config import Config, ConfigError, load_config
from mailx.maillog import MAIL_NAMESPACE, maillog
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

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
            self.mailboxes = local_recipients.LocalRecipients(self.config)
            self.users = auth.load_users(self.config.auth.users_file)
        except (ConfigError, auth.UsersFileError) as error:
            raise usage.UsageError(f"configuration: {error}") from None
        self.tls = None
        if self.config.tls.enabled:
            try:
                self.tls = ReloadableContext(
                    self.config.tls.certificate, self.config.tls.key
                )
            except TLSConfigError as error:
                raise usage.UsageError(f"configuration: tls: {error}") from None
        if self.config.server.smtps and self.tls is None:
            raise usage.UsageError(
                "configuration: server.smtps: implicit TLS needs tls.certificate"
                " and tls.key"
            )


class MailxService(MultiService):
    """The listeners, the spool and the housekeeping around them."""

    def __init__(self, config: Config, tls: ReloadableContext | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.tls = tls
        self.factories: list[SMTPServerFactory] = []
        self._mail_log: ILogObserver | None = None
        self._mail_log_file: IO[str] | None = None

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
        if self._mail_log is not None and self._mail_log_file is not None:
            globalLogPublisher.removeObserver(self._mail_log)
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
        """Copy the mail log namespace into its own file, one line an event."""
        file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at stop
        self._mail_log_file = file

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") != MAIL_NAMESPACE:
                return
            line = formatEventAsClassicLogText(event)
            if line:
                file.write(line)
                file.flush()

        self._mail_log = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(self._mail_log)


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
