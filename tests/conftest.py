"""Fixtures shared by the test modules."""

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from tests.mailxproc import mailx_server

__all__ = ["clock", "mail_log", "mailx_server"]


@implementer(ILogObserver)
class MailLogObserver:
    """Keeps the text of every mail log event."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "mailx.mail":
            self.lines.append(formatEvent(event))


@pytest.fixture
def mail_log() -> Iterator[list[str]]:
    """The mail log lines emitted during a test."""
    observer = MailLogObserver()
    globalLogPublisher.addObserver(observer)
    yield observer.lines
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def clock() -> Clock:
    return Clock()
