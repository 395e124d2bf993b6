"""
``twistd mailx``: command-line options and the service tree.

Everything that can be wrong with the configuration (the TOML itself, the
TLS certificate and key, the aliases and users files, directories that
cannot be written, a queue another server holds) is checked while the
options are parsed, and a port that cannot be bound while the listeners
start, so a bad start says one clear line and serves nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, ClassVar, TypeVar, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    globalLogPublisher,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from mailx import auth
from mailx import local as local_recipients
from mailx.agentprocess import (
    STOP_TIMEOUT,
    AgentProcess,
    MaildirAgent,
    SpoolAgent,
    start_problem,
)
from mailx.backup import backup_check_from_config
from mailx.config import Config, ConfigError, load_config
from mailx.files import open_regular_for_append
from mailx.maillog import MailLogFile, maillog
from mailx.maillog import router as maillog_router
from mailx.outbound import agent_from_config
from mailx.policy import RelayPolicy
from mailx.protocol import ConnectionLimits, ListenerSettings, SMTPServerFactory
from mailx.router import (
    GroupCommit,
    LocalFirstAgent,
    LocalStore,
    MaildirCommit,
    Router,
)
from mailx.session import SessionConfig
from mailx.spool import DeliveryAgent, Spool, clear_stale_socket
from mailx.tls import ReloadableContext, TLSConfigError
from mailx.workers import HandoffQueue, WorkerPool, handoff_path

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
    queue_lock: IO[str] | None
    # A worker process (mailx.workers) shares the main process's queue.
    worker = False

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
        server = self.config.server
        if (server.submission or server.smtps) and not len(self.users):
            # Both kinds of listener take mail only after AUTH (RFC 6409
            # section 4.3), which needs users to check passwords against.
            key = "server.submission" if server.submission else "server.smtps"
            path = self.config.auth.users_file
            lack = f"{path} lists no users" if path else "which needs auth.users_file"
            raise ConfigError(
                f"{key}: these listeners take mail only after AUTH, {lack}"
            )
        _check_writable_directory("mailboxes.root", self.config.mailboxes.root)
        _check_writable_directory("queue.directory", self.config.queue.directory)
        control = os.path.dirname(self.config.server.control_socket) or "."
        _check_writable_directory("server.control_socket", control)
        if self.config.log.mail_log:
            _check_writable_file("log.mail_log", self.config.log.mail_log)
        if not self.worker:
            server = self.config.server
            for key in ("listen", "submission", "smtps"):
                for endpoint in getattr(server, key):
                    _check_port_free(f"server.{key}", endpoint)
        self.queue_lock = None
        if not self.worker:
            self.queue_lock = _lock_queue(self.config.queue.directory)


def _check_writable_directory(key: str, path: str) -> None:
    """Create ``path`` if missing; it must be a directory mailx can write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{key}: cannot create {path!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path!r} is not writable")


def _check_port_free(key: str, endpoint: str) -> None:
    """
    Bind a TCP endpoint's address once and let it go: a port in use (or not
    ours to bind) is told here in one line.  Other endpoint types, and the
    rare port taken in between, are told when the listeners start.
    """
    # Twisted endpoint strings escape the colons of IPv6 addresses.
    kind, *arguments = re.split(r"(?<!\\):", endpoint)
    if kind not in ("tcp", "tcp6") or not arguments or "=" in arguments[0]:
        return
    options = dict(argument.partition("=")[::2] for argument in arguments[1:])
    interface = options.get("interface", "").replace("\\", "")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    if not interface:
        interface = "::" if kind == "tcp6" else "0.0.0.0"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, int(arguments[0])))
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(
                f"{key}: cannot listen on {interface}:{arguments[0]}: {reason}"
            ) from None


def _check_writable_file(key: str, path: str) -> None:
    try:
        with open_regular_for_append(path):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot open {path!r}: {error.strerror}") from None


# Tries and the wait between them before the queue counts as taken.
LOCK_TRIES = 30
LOCK_RETRY_WAIT = 0.1


def _lock_queue(directory: str) -> IO[str]:
    """
    Hold a lock on the queue directory for as long as this process runs: two
    servers on one queue would deliver every message twice.
    """
    path = os.path.join(directory, "lock")
    lock = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held until exit
    try:
        # Tries for a few seconds: ``mailx queue`` takes the lock for an
        # instant to see whether a server holds it (mailx.cli), and the
        # spool agent of a server that was killed holds it until it has
        # finished its last batch (mailx.agentprocess).
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise
                time.sleep(LOCK_RETRY_WAIT)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"queue.directory: {directory!r} is in use by another mailx ({holder},"
            " or its spool agent if it has just ended)"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


class MailxService(MultiService):
    """The listeners, the spool and the housekeeping around them."""

    def __init__(
        self, config: Config, tls: ReloadableContext | None, clock: IReactorTime
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.tls = tls
        self.clock = clock
        self.factories: list[SMTPServerFactory] = []
        self.workers: WorkerPool | None = None
        self.spool_agent: SpoolAgent | None = None
        # A worker process (mailx.workers) says nothing of the server's stop.
        self.is_worker = False
        # While stopping: when to look for hung agents, and what they had
        # answered at the last look.
        self._deadline: IDelayedCall | None = None
        self._agents_seen: dict[str, int] = {}
        # What SIGHUP reloads besides the certificate (set by build_service).
        self.parts: _Parts | None = None
        self._mail_log_file: IO[str] | None = None
        self._mail_log: MailLogFile | None = None

    def privilegedStartService(self) -> None:
        # Listeners bind here, before twistd drops privileges.
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            # An exception, not SystemExit: a daemonizing twistd reports it
            # to the terminal through its status pipe.
            port = error.port
            if isinstance(port, bytes):
                # A UNIX socket's path.
                port = os.fsdecode(port)
            raise RuntimeError(
                f"mailx: cannot listen on {error.interface or '*'}:{port}:"
                f" {error.socketError}"
            ) from None

    def startService(self) -> None:
        if self.config.log.mail_log:
            self._open_mail_log(self.config.log.mail_log)
        # SIGHUP: re-read the certificate and reopen the mail log (after
        # logrotate moved it); never the default, which ends the process.
        signal.signal(signal.SIGHUP, self._on_sighup)
        super().startService()  # type: ignore[no-untyped-call]
        # Now as the user twistd runs as: can it start the agents?
        problem = start_problem() if self._agents() else None
        if problem is not None:
            maillog.error(
                "the agents cannot start ({problem}): local mail is queued"
                " and mail to queue is refused with 451 until they can",
                problem=problem,
            )
        if self.is_worker:
            # The main process says it, once for the server.
            return
        maillog.info(
            "mailx started as {hostname}; local={local} backup={backup}",
            hostname=self.config.server.hostname,
            local=",".join(self.config.domains.local),
            backup=",".join(self.config.domains.backup),
        )

    def stopService(self) -> Deferred[None] | None:
        if not self.is_worker:
            maillog.info(
                "mailx stopping: open sessions get 421, deliveries under way finish"
            )
        for factory in self.factories:
            factory.shut_down()
        # The listeners close at once, and the workers end (they hand what
        # they took to this process meanwhile): no new session starts while
        # the agents finish.
        closing = [
            maybeDeferred(child.stopService)
            for child in list(self)
            if isinstance(child, (_Listener, _AdoptedListener, WorkerPool))
            and getattr(child, "listener", "") != "handoff"
        ]
        stopping: Deferred[Any] = gatherResults(closing, consumeErrors=True)
        # An agent that hangs (a disk that does not answer) must not keep the
        # server from ending: one that has left a request unanswered for
        # STOP_TIMEOUT is killed, and what it had not answered fails (queued
        # or refused, as when an agent dies).
        self._agents_seen = {agent.name: agent.answered for agent in self._agents()}
        self._deadline = self.clock.callLater(STOP_TIMEOUT, self._kill_hung_agents)
        # Then the Maildir delivery agent answers what it has (a message it
        # could not write still goes to the spool, which is running); from
        # now on local copies go to the spool.  The spool agent stops after
        # the spool, which waits for the changes under way.
        agent = self.parts.agent if self.parts is not None else None
        if agent is not None:
            stopping.addBoth(lambda _: agent.stop())
        stopping.addBoth(lambda _: self._stop_services())
        if self.spool_agent is not None:
            spool_agent = self.spool_agent
            stopping.addBoth(lambda _: spool_agent.stop())
        stopping.addBoth(self._cancel_deadline)
        # The spool may still log while its attempts end: close afterwards.
        stopping.addBoth(self._say_stopped)
        return stopping.addBoth(self._close_mail_log)

    def _say_stopped(self, result: object) -> object:
        if not self.is_worker:
            maillog.info("mailx stopped")
        return result

    def _kill_hung_agents(self) -> None:
        """Kill an agent that answered nothing since the last look."""
        for agent in self._agents():
            if not agent.running or not agent.unanswered:
                continue
            # Its answers so far, by count: none new since the last look
            # while requests wait means it hangs.
            answered = agent.answered
            if self._agents_seen.get(agent.name) == answered:
                maillog.error(
                    "{agent} agent answered nothing for {seconds} s while the"
                    " server stops: killing it",
                    agent=agent.name,
                    seconds=int(STOP_TIMEOUT),
                )
                agent.stop()
                agent.kill()
            self._agents_seen[agent.name] = answered
        if self._deadline is not None:
            # Not stopped yet (a kill may have let the stop end just now).
            self._deadline = self.clock.callLater(STOP_TIMEOUT, self._kill_hung_agents)

    def _agents(self) -> list[AgentProcess]:
        agents = [self.spool_agent, self.parts.agent if self.parts else None]
        return [agent for agent in agents if agent is not None]

    def _cancel_deadline(self, result: object) -> object:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        return result

    def _stop_services(self) -> Deferred[None] | None:
        return super().stopService()  # type: ignore[no-untyped-call,no-any-return]

    def _close_mail_log(self, result: object) -> None:
        if self._mail_log_file is not None:
            maillog_router.destination = globalLogPublisher
            try:
                if self._mail_log is not None:
                    self._mail_log.flush()
                self._mail_log_file.close()
            except OSError as error:
                # The old file is gone from under us; its last lines with it.
                maillog.error(
                    "mail log could not be closed cleanly: {error}",
                    error=error.strerror or str(error),
                )
            self._mail_log_file = None
            self._mail_log = None

    def _on_sighup(self, signum: int, frame: object) -> None:
        from twisted.internet import reactor

        cast(IReactorFromThreads, reactor).callFromThread(self._reload)

    def _reload(self) -> None:
        if self.config.log.mail_log:
            self._reopen_mail_log(self.config.log.mail_log)
        if self.tls is not None:
            self._reload_tls()
        if self.parts is not None:
            self.parts.reload_tables()
        if self.workers is not None:
            self.workers.signal_all("HUP")

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

    def _reopen_mail_log(self, path: str) -> None:
        """
        After logrotate moved the mail log: open the file anew, and only then
        let the old one go.  If it cannot be opened the lines keep going to
        the old file, the error says why, and the next SIGHUP tries again.
        """
        try:
            file = open_regular_for_append(path)
        except OSError as error:
            maillog.error(
                "mail log {path} cannot be reopened, writing on to the old file:"
                " {error}",
                path=path,
                error=error.strerror or str(error),
            )
            return
        self._close_mail_log(None)
        self._use_mail_log(file)
        maillog.info("mail log reopened")

    def _open_mail_log(self, path: str) -> None:
        """Send the mail log to its own file, instead of the twistd log."""
        self._use_mail_log(open_regular_for_append(path))

    def _use_mail_log(self, file: IO[str]) -> None:
        self._mail_log_file = file
        self._mail_log = MailLogFile(file, self.clock)
        maillog_router.destination = self._mail_log


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(
        options.config,
        options.tls,
        options.mailboxes,
        reactor,
        options.users,
        config_path=options["config"],
        queue_lock=options.queue_lock,
    )


def build_service(
    config: Config,
    tls: ReloadableContext | None,
    mailboxes: local_recipients.LocalRecipients,
    reactor: Any,
    users: auth.Users | None = None,
    outbound: DeliveryAgent | None = None,
    config_path: str | None = None,
    queue_lock: IO[str] | None = None,
) -> MailxService:
    """Assemble the whole server; tests call this with their own reactor."""
    service = MailxService(config, tls, reactor)
    parts = _Parts(config, tls, mailboxes, reactor, users)
    service.parts = parts
    if IReactorProcess.providedBy(reactor):
        # The spool's new messages and removals are written by an agent.
        # It holds the queue's lock too, so that a server started after
        # this one was killed waits for it to finish its last batch.
        service.spool_agent = SpoolAgent(
            reactor,
            config.queue.directory,
            lock=queue_lock.fileno() if queue_lock is not None else None,
        )
    if outbound is None:
        outbound = agent_from_config(reactor, config)
    agent = LocalFirstAgent(parts.store, config.domains.local, outbound)
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
        changes=service.spool_agent,
    )
    spool.setServiceParent(service)  # type: ignore[no-untyped-call]
    agent.requeue = spool.enqueue
    router = Router(parts.store, spool)

    listeners = []
    for name, endpoint, factory in parts.factories(router, service):
        listener = _Listener(serverFromString(reactor, endpoint), factory, name)
        listener.setServiceParent(service)  # type: ignore[no-untyped-call]
        listeners.append(listener)

    if config.server.workers > 1:
        handoff = parts.handoff_factory(router, service)
        path = handoff_path(config.server.control_socket)
        # Left by a main process killed a moment ago (a supervisor restarting
        # it): the queue's lock, held by now, says no other server runs.
        clear_stale_socket(path)
        unix = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
        _Listener(unix, handoff, "handoff").setServiceParent(  # type: ignore[no-untyped-call]
            service
        )
        pool = WorkerPool(reactor, config.server.workers, config_path, listeners)
        pool.setServiceParent(service)  # type: ignore[no-untyped-call]
        service.workers = pool
    return service


def build_worker(
    options: Options, reactor: Any, listeners: list[tuple[int, int, int]]
) -> MailxService:
    """
    A worker process's server (mailx.workers): the same listeners, adopted
    from the main process by (index, file descriptor, address family), and
    mail to pass on handed to the main process.
    """
    config = options.config
    service = MailxService(config, options.tls, reactor)
    service.is_worker = True
    parts = _Parts(config, options.tls, options.mailboxes, reactor, options.users)
    service.parts = parts
    queue = HandoffQueue(
        reactor, handoff_path(config.server.control_socket), config.server.hostname
    )
    router = Router(parts.store, queue)
    factories = list(parts.factories(router, service))
    for index, descriptor, family in listeners:
        name, _, factory = factories[index]
        adopted = _AdoptedListener(reactor, descriptor, family, factory, name)
        adopted.setServiceParent(service)  # type: ignore[no-untyped-call]
    return service


class _Parts:
    """What the main process and the workers build alike."""

    def __init__(
        self,
        config: Config,
        tls: ReloadableContext | None,
        mailboxes: local_recipients.LocalRecipients,
        reactor: Any,
        users: auth.Users | None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.reactor = reactor
        self.mailboxes = mailboxes
        if users is None:
            users = auth.load_users(config.auth.users_file)

        def run_io(work: Callable[[], _T]) -> Deferred[_T]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), work)

        # Maildirs are written by a delivery agent process (mailx.agents).
        self.agent: MaildirAgent | None = None
        commit: MaildirCommit
        if IReactorProcess.providedBy(reactor):
            self.agent = commit = MaildirAgent(reactor)
        else:
            commit = GroupCommit(run_io)
        self.store = LocalStore(config.mailboxes.root, mailboxes, commit)
        self.policy = RelayPolicy(
            config.domains.local,
            config.domains.backup,
            config.relay.networks,
            lambda address: bool(mailboxes.resolve(address)),
            backup_check=backup_check_from_config(config, reactor),
            sender_addresses=users.sender_addresses,
        )
        # auth wiring (issue 3): the authenticator for AUTH PLAIN and LOGIN.
        self.authenticator = auth.build_authenticator(
            users, reactor, config.limits.max_auth_failures, run_io
        )
        self.limits = ConnectionLimits(
            config.limits.max_connections, config.limits.max_connections_per_client
        )

    def reload_tables(self) -> None:
        """
        SIGHUP: read the aliases and users files again.  A file with a
        mistake leaves what was in force as it was, and the mail log says
        why; mailx.toml itself is read only at start.
        """
        if self.mailboxes.aliases_path:
            try:
                self.mailboxes.reload_aliases()
            except ConfigError as error:
                maillog.error(
                    "aliases reload failed, keeping the old aliases: {error}",
                    error=str(error),
                )
            else:
                maillog.info(
                    "aliases reloaded from {path}: {count} addresses",
                    path=self.mailboxes.aliases_path,
                    count=self.mailboxes.alias_count,
                )
        path = self.config.auth.users_file
        if not path:
            return
        try:
            users = auth.load_users(path)
        except auth.UsersFileError as error:
            maillog.error(
                "users reload failed, keeping the old users: {error}", error=str(error)
            )
            return
        self.policy.replace_sender_addresses(users.sender_addresses)
        if self.authenticator is not None:
            self.authenticator.replace_users(users)
            maillog.info(
                "users reloaded from {path}: {count} users", path=path, count=len(users)
            )
            if not len(users):
                maillog.warn(
                    "users file {path} lists no users now: nobody can"
                    " authenticate until it does",
                    path=path,
                )
        elif len(users):
            # The listeners were made without AUTH: offering it needs them anew.
            maillog.warn(
                "users file {path} has users now, but AUTH was off at start:"
                " restart mailx to offer AUTH",
                path=path,
            )

    def session_config(
        self, require_auth: bool, tls_available: bool, add_trace: bool = True
    ) -> SessionConfig:
        limits = self.config.limits
        return SessionConfig(
            hostname=self.config.server.hostname,
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            max_errors=limits.max_errors,
            max_hops=limits.max_hops,
            tls_available=tls_available,
            require_auth=require_auth,
            add_trace=add_trace,
        )

    def factories(
        self, router: Router, service: MailxService
    ) -> Iterator[tuple[str, str, Any]]:
        """(listener name, endpoint string, factory) for every listener."""
        server = self.config.server
        listeners = (
            [("smtp", endpoint, False, False) for endpoint in server.listen]
            + [("submission", endpoint, True, False) for endpoint in server.submission]
            + [("smtps", endpoint, True, True) for endpoint in server.smtps]
        )
        tls = self.tls
        for name, endpoint, require_auth, implicit_tls in listeners:
            starttls = tls is not None and not implicit_tls
            settings = ListenerSettings(
                name=name,
                session=self.session_config(require_auth, starttls),
                idle_timeout=self.config.limits.idle_timeout,
                implicit_tls=implicit_tls,
                tls=tls,
            )
            factory = SMTPServerFactory(
                settings,
                self.policy,
                router,
                self.reactor,
                self.limits,
                self.authenticator,
            )
            service.factories.append(factory)
            wrapped: Any = factory
            if implicit_tls:
                assert tls is not None
                wrapped = TLSMemoryBIOFactory(tls, False, factory)
            yield name, endpoint, wrapped

    def handoff_factory(self, router: Router, service: MailxService) -> Any:
        """The main process's listener for mail its workers pass on."""
        settings = ListenerSettings(
            name="handoff",
            # The worker already added the trace header and counted hops.
            session=self.session_config(False, False, add_trace=False),
            idle_timeout=self.config.limits.idle_timeout,
        )
        workers = self.config.server.workers
        limits = ConnectionLimits(
            self.config.limits.max_connections * workers,
            self.config.limits.max_connections * workers,
        )
        factory = SMTPServerFactory(settings, self.policy, router, self.reactor, limits)
        service.factories.append(factory)
        return factory


class _Listener(Service):
    """A listening port, bound before privileges are dropped."""

    def __init__(self, endpoint: Any, factory: Any, name: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        # Not Service.name: a MultiService wants those unique.
        self.listener = name
        self.port: Any = None

    def privilegedStartService(self) -> None:
        outcome: list[Any] = []
        # TCP and UNIX endpoints listen at once: the Deferred has fired.
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        # Stopped early by MailxService, then again with the others.
        port, self.port = self.port, None
        if port is not None:
            return cast("Deferred[None]", port.stopListening())
        return None


class _AdoptedListener(Service):
    """A worker's share of one of the main process's listening sockets."""

    def __init__(
        self, reactor: Any, descriptor: int, family: int, factory: Any, name: str
    ) -> None:
        self.reactor = reactor
        self.descriptor = descriptor
        self.family = family
        self.factory = factory
        # Not Service.name: a MultiService wants those unique.
        self.listener = name
        self.port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.port = self.reactor.adoptStreamPort(
            self.descriptor, socket.AddressFamily(self.family), self.factory
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is not None:
            return cast("Deferred[None]", port.stopListening())
        return None
