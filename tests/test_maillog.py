"""The mail log file: one line an event, rendered as Twisted would."""

from __future__ import annotations

import io
from pathlib import Path
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from mailx.maillog import MailLogFile, MailLogRouter, PrintableLogger
from mailx.replies import Reply


def event(template: str, **fields: object) -> LogEvent:
    return {
        "log_format": template,
        "log_time": 1_700_000_000.5,
        "log_level": LogLevel.info,
        "log_namespace": "mailx.mail",
        **fields,
    }


def test_lines_match_twisted_rendering() -> None:
    """Each line is a timestamp, the namespace and level, and the text."""
    out = io.StringIO()
    log = MailLogFile(out)
    cases = [
        event(
            "connect from [{client_address}]:{client_port}",
            client_address="::1",
            client_port=25,
        ),
        event("expired {message_id} age={age:.0f}", message_id="ID", age=12.6),
        event("plain text with {{braces}}"),
        event("{missing} field"),
        event("{a.b} attribute", a=object()),
    ]
    for case in cases:
        log(case)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(cases)
    for line, case in zip(lines, cases, strict=True):
        stamp, tag, text = line.split(" ", 2)
        assert stamp.startswith("2023-11-1")
        assert tag == "[mailx.mail#info]"
        assert text == formatEvent(case)
    assert lines[0].endswith("connect from [::1]:25")
    assert lines[1].endswith("expired ID age=13")


def test_mail_logger_events_are_twisted_logger_events() -> None:
    """The mail log's Logger emits what Twisted's would, for every level."""
    ours: list[LogEvent] = []
    theirs: list[LogEvent] = []
    mail = PrintableLogger(
        namespace="mailx.mail", observer=cast(ILogObserver, ours.append)
    )
    plain = Logger(namespace="mailx.mail", observer=cast(ILogObserver, theirs.append))
    for level in LogLevel.iterconstants():
        mail.emit(level, "queued {message_id}", message_id="ID")
        plain.emit(level, "queued {message_id}", message_id="ID")
    assert len(ours) == len(theirs) == len(list(LogLevel.iterconstants()))
    for mine, twisted_event in zip(ours, theirs, strict=True):
        assert mine["log_logger"] is mail
        assert abs(mine.pop("log_time") - twisted_event.pop("log_time")) < 5
        assert {k: v for k, v in mine.items() if k != "log_logger"} == {
            k: v for k, v in twisted_event.items() if k != "log_logger"
        }
        assert formatEvent(mine) == "queued ID"


def test_mail_logger_reports_a_level_that_is_not_one() -> None:
    """A bad level is reported as Twisted's Logger reports it, not emitted."""
    seen: list[LogEvent] = []
    mail = PrintableLogger(
        namespace="mailx.mail", observer=cast(ILogObserver, seen.append)
    )
    mail.emit("loud", "queued {message_id}", message_id="ID")  # type: ignore[arg-type]
    assert len(seen) == 1
    assert seen[0]["log_level"] is LogLevel.critical
    assert "invalid log level" in formatEvent(seen[0])


def test_a_failure_also_reaches_the_twistd_log() -> None:
    """An event with a traceback is kept in the twistd log as well."""
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        failed = event("storing failed")
        failed["log_failure"] = Failure(OSError("disk full"))
        MailLogFile(io.StringIO())(failed)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen == [failed]


def test_lines_of_one_turn_are_flushed_at_its_end(tmp_path: Path) -> None:
    """With a clock, lines reach the file when the reactor's turn ends, or on
    flush; without one, at once."""
    path = tmp_path / "mail.log"
    clock = Clock()
    with open(path, "a", encoding="utf-8") as out:
        log = MailLogFile(out, clock)
        log(event("first"))
        log(event("second"))
        assert path.read_text() == ""
        clock.advance(0)
        assert path.read_text().splitlines()[1].endswith("second")
        log(event("third"))
        log.flush()
        assert len(path.read_text().splitlines()) == 3
        assert clock.getDelayedCalls() == []

        MailLogFile(out)(event("fourth"))
        assert path.read_text().splitlines()[3].endswith("fourth")


def test_control_characters_from_clients_do_not_reach_the_log() -> None:
    """An escape sequence or NUL a client sent is written as "?", so reading
    the log on a terminal is safe; the event's own format is untouched."""
    out = io.StringIO()
    router = MailLogRouter()
    router.destination = MailLogFile(out)
    PrintableLogger(namespace="mailx.mail", observer=router).info(
        "reject: MAIL from [{client_address}]: 553; from=<{sender}>",
        client_address="192.0.2.1",
        sender="\x1b[2Jx\x00@example.com",
    )
    line = out.getvalue()
    assert "\x1b" not in line and "\x00" not in line
    assert line.endswith("from=<?[2Jx?@example.com>\n")


def test_fields_of_every_type_are_written_as_given_or_made_printable() -> None:
    """Numbers, booleans and None are written as they are; text of any kind,
    a str subclass included, has its control characters made "?"."""

    class Tagged(str):
        pass

    out = io.StringIO()
    router = MailLogRouter()
    router.destination = MailLogFile(out)
    PrintableLogger(namespace="mailx.mail", observer=router).info(
        "n={n} f={f:.1f} b={b} none={none} tagged={tagged} big={big}",
        n=5,
        f=1.25,
        b=True,
        none=None,
        tagged=Tagged("a\x1bb"),
        big=2**70,
    )
    assert out.getvalue().endswith(
        f"n=5 f=1.2 b=True none=None tagged=a?b big={2**70}\n"
    )


def test_module_loggers_keep_control_characters_out_of_the_twistd_log() -> None:
    """A next hop's reply with an escape sequence (a Reply, not a str),
    logged by a mailx module to the twistd log, arrives there printable."""
    from mailx import outbound

    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        outbound.log.info(
            "kept connection to {host} took nothing ({reply})",
            host="mx.test",
            reply=Reply(421, "4.3.2", "\x1b]0;pwned\x07\x1b[31m bye"),
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    (event,) = seen
    assert event["log_namespace"] == "mailx.outbound"
    assert formatEvent(event) == (
        "kept connection to mx.test took nothing (421 4.3.2 ?]0;pwned??[31m bye)"
    )


def test_a_logged_failure_keeps_its_traceback() -> None:
    """``log.failure`` through a mailx logger still carries a Failure, so the
    twistd log gets the traceback, not a flattened text of it."""
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    log = PrintableLogger(namespace="mailx.test", observer=observer)
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        log.failure("storing {message_id} failed", message_id="ID\x1b")
    (event,) = seen
    assert isinstance(event["log_failure"], Failure)
    assert "second line" in event["log_failure"].getTraceback()
    assert formatEvent(event) == "storing ID? failed"


class FillingFile(io.StringIO):
    """A file on a disk that fills up: while ``full``, nothing is written."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.held: list[str] = []

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        return super().write(text)

    def flush(self) -> None:
        if self.full:
            raise OSError(28, "No space left on device")


def test_a_full_disk_costs_mail_log_lines_and_says_so_once() -> None:
    """While the mail log's disk is full its lines are lost, the twistd log
    says so once (not once a line), and the log itself says how many were
    lost once it can be written again."""
    out = FillingFile()
    clock = Clock()
    log = MailLogFile(out, clock)
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        log(event("before"))
        clock.advance(0)
        out.full = True
        for n in range(3):
            log(event("lost {n}", n=n))
            clock.advance(0)
        out.full = False
        log(event("after"))
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(observer)

    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] before")
    assert lines[1] == ""
    assert lines[2].endswith(
        "[mailx.mail#error] mail log lines lost while it could not be written"
        " ([Errno 28] No space left on device): about 3"
    )
    assert lines[3].endswith("] after")
    assert [formatEvent(e) for e in seen] == [
        "the mail log cannot be written ([Errno 28] No space left on device):"
        " its lines are lost until it can be",
        "the mail log is written again; about 3 lines lost",
    ]
