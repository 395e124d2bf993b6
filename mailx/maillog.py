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

import time
from typing import IO

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
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


router = MailLogRouter()
maillog = Logger(namespace=MAIL_NAMESPACE, observer=router)


@implementer(ILogObserver)
class MailLogFile:
    """Writes each event as ``time [namespace#level] text``, one line."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self._second = -1
        self._stamp = ""

    def __call__(self, event: LogEvent) -> None:
        when = event.get("log_time") or time.time()
        second = int(when)
        if second != self._second:
            # One strftime a second, not one an event.
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))
        level = event.get("log_level")
        level_name = level.name if level is not None else "info"
        text = formatEvent(event).replace("\n", "\n\t")
        self.file.write(f"{self._stamp} [{MAIL_NAMESPACE}#{level_name}] {text}\n")
        self.file.flush()
