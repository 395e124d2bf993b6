"""
The mail log: one line per business event, for operators to read and parse.

Every event goes through ``twisted.logger`` in the ``mailx.mail`` namespace,
with named fields.  Its text is an interface: keep the wording stable, and
change the tests that pin it when it must change.  Credentials never appear.

By default the events go to the global log (twistd's log file).  When
``log.mail_log`` names a file, ``MailLogFile`` takes them instead, written
there alone, in the same line format, without being formatted a second time
for the twistd log.
"""

from __future__ import annotations

import string
import time
from typing import IO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

MAIL_NAMESPACE = "mailx.mail"


@implementer(ILogObserver)
class MailLogRouter:
    """Sends mail log events to one destination, the global log by default."""

    def __init__(self) -> None:
        self.destination: ILogObserver = globalLogPublisher

    def __call__(self, event: LogEvent) -> None:
        self.destination(event)


def printable(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character not in ``keep`` as "?"."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else "?" for c in text)


_LEVELS = frozenset(LogLevel.iterconstants())


class PrintableLogger(Logger):
    """
    A ``Logger`` whose events' text fields are made printable: mailx's
    loggers, for the mail log and for the twistd log.

    The fields carry what clients and next hops sent (paths, HELO names,
    user names, replies): a control character in them is shown as "?", so
    that an escape sequence never reaches an operator's terminal through a
    log; so is one in the text of any other object (a reply, an exception).
    Only the fields the caller gave are looked at, not Twisted's own
    ``log_`` fields.

    ``Logger.emit`` walks every ``LogLevel`` constant on each event to
    validate the level, about a tenth of the mail log's cost under load
    (issue 7); here a set look-up does.  A level that is not a ``LogLevel``
    still goes to ``Logger.emit``, which reports it.
    """

    def emit(
        self, level: LogLevel, format: str | None = None, **kwargs: object
    ) -> None:
        for key, value in kwargs.items():
            # By exact type first: most fields are plain text or numbers
            # (seven lines a message, issue 7).
            kind = type(value)
            if kind is int or kind is float or kind is bool or value is None:
                continue
            if key.startswith("log_"):
                # Twisted's own, such as the Failure of ``Logger.failure``.
                continue
            if isinstance(value, str):
                if not value.isprintable():
                    kwargs[key] = printable(value)
            elif not isinstance(value, int | float):
                # A reply, an address, an exception: written as its text,
                # which may carry what a peer sent.
                text = str(value)
                if not text.isprintable():
                    kwargs[key] = printable(text)
        if level not in _LEVELS or "log_trace" in kwargs:
            super().emit(level, format, **kwargs)
            return
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        self.observer(kwargs)


router = MailLogRouter()
maillog = PrintableLogger(namespace=MAIL_NAMESPACE, observer=router)
# The mail log's own troubles: to the twistd log.
_log = PrintableLogger(namespace="mailx.maillog")


@implementer(ILogObserver)
class MailLogFile:
    """
    Writes each event as ``time [namespace#level] text``, one line.

    Without ``clock`` every line is flushed as it is written.  With one, the
    lines of one turn of the reactor are flushed together at its end: one
    ``write`` for many events under load (issue 7), and never more than a
    turn behind.  ``flush`` writes out what is pending at once.
    """

    def __init__(self, file: IO[str], clock: IReactorTime | None = None) -> None:
        self.file = file
        self._clock = clock
        self._flush_call: IDelayedCall | None = None
        self._second = -1
        self._stamp = ""
        # While the file cannot be written (a full disk): why, and how many
        # lines were given meanwhile.
        self._failure: str | None = None
        self._lost = 0

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._flush_file()

    def __call__(self, event: LogEvent) -> None:
        if "log_failure" in event:
            # A traceback belongs in the twistd log as well, where it is kept.
            globalLogPublisher(event)
        when = event.get("log_time") or time.time()
        second = int(when)
        if second != self._second:
            # One strftime a second, not one an event.
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))
        level = event.get("log_level")
        level_name = level.name if level is not None else "info"
        text = _render(event).replace("\n", "\n\t")
        if self._failure is not None:
            # Writable again?  Then the note on what was lost comes first.
            self._flush_file()
        if self._failure is not None:
            self._lost += 1
        try:
            self.file.write(f"{self._stamp} [{MAIL_NAMESPACE}#{level_name}] {text}\n")
        except OSError as error:
            self._failed(error)
        if self._clock is None:
            self._flush_file()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush_call = None
        self._flush_file()

    def _flush_file(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self._failed(error)
            return
        if self._failure is not None:
            self._recovered()

    def _failed(self, error: OSError) -> None:
        """Said once in the twistd log, not once a line: mail goes on."""
        if self._failure is None:
            self._failure = str(error)
            self._lost = 1
            _log.error(
                "the mail log cannot be written ({error}): its lines are lost"
                " until it can be",
                error=str(error),
            )

    def _recovered(self) -> None:
        """Written again: the file says how many lines it lost, and why."""
        failure, self._failure = self._failure, None
        lost, self._lost = self._lost, 0
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # On a line of its own, after whatever part of a line the disk took.
        note = (
            f"\n{stamp} [{MAIL_NAMESPACE}#error] mail log lines lost while it"
            f" could not be written ({failure}): about {lost}\n"
        )
        try:
            self.file.write(note)
            self.file.flush()
        except OSError as error:
            self._failed(error)
            return
        _log.info("the mail log is written again; about {lost} lines lost", lost=lost)


# Format string -> whether it has plain named fields only ({name} and
# {name:spec}), which str.format_map fills in as Twisted's formatEvent does.
_plain: dict[str, bool] = {}


def _render(event: LogEvent) -> str:
    """The event's text: its format string with its named fields filled in.

    The mail log formats are plain ``{name}`` and ``{name:spec}`` fields, so
    each is checked once and then filled in by ``str.format_map``; anything
    else falls back to Twisted's formatEvent.
    """
    template = event.get("log_format")
    if not isinstance(template, str):
        return formatEvent(event)
    plain = _plain.get(template)
    if plain is None:
        plain = _plain[template] = _is_plain(template)
    if not plain:
        return formatEvent(event)
    try:
        return template.format_map(event)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError):
        return formatEvent(event)


def _is_plain(template: str) -> bool:
    try:
        return all(
            field is None or (not conversion and field.isidentifier())
            for _, field, _, conversion in string.Formatter().parse(template)
        )
    except ValueError:
        return False
