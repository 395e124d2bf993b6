"""Tests for mailx.queue: the stored envelope, the retry policy, the schedule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailx.address import Address
from mailx.envelope import Body, ClientInfo, Envelope, Recipient, Route
from mailx.queue import (
    MessageKind,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    RetryPolicy,
    Schedule,
)
from mailx.replies import Reply

POLICY = RetryPolicy(min_retry=300, max_retry=3600, lifetime=86400, delay_warning=0)


def message(arrival: float = 0.0) -> QueuedMessage:
    return QueuedMessage(
        message_id="Q1",
        reverse_path=Address("alice", "example.org"),
        recipients=[QueuedRecipient(Address("bob", "example.com"))],
        arrival=arrival,
        size=10,
        next_attempt=arrival,
    )


def test_envelope_round_trips_through_json() -> None:
    """Every field of an accepted envelope survives writing and reading."""
    accepted = Envelope(
        reverse_path=None,
        recipients=[
            Recipient(
                Address('"odd@local"', "[192.0.2.7]"),
                Route.BACKUP,
                frozenset({"SUCCESS", "DELAY"}),
                "rfc822;odd+40local",
            )
        ],
        body=Body.EIGHT_BIT,
        smtputf8=True,
        ret="HDRS",
        envid="E1",
        client=ClientInfo("2001:db8::1", 25, helo="client"),
        received_at=12.5,
    )
    stored = QueuedMessage.from_envelope("Q1", accepted, 99, 20.0)
    stored.recipients[0].reply = Reply(450, "4.2.0", "Busy\nline two")
    stored.recipients[0].state = RecipientState.PENDING
    stored.kind = MessageKind.DSN
    stored.hold = True

    assert QueuedMessage.from_json(stored.to_json()) == stored
    assert stored.arrival == 12.5
    assert stored.to_envelope(stored.recipients).recipients == accepted.recipients


@given(
    local=st.text(min_size=1, max_size=20),
    domain=st.text(min_size=1, max_size=20),
    attempts=st.integers(min_value=0, max_value=10_000),
)
def test_any_address_round_trips(local: str, domain: str, attempts: int) -> None:
    """Addresses of any text, UTF-8 included, are stored without change."""
    stored = message()
    stored.recipients = [QueuedRecipient(Address(local, domain), attempts=attempts)]
    assert QueuedMessage.from_json(stored.to_json()) == stored


def test_malformed_envelope_is_refused() -> None:
    """A file that is not an envelope raises ValueError."""
    with pytest.raises(ValueError):
        QueuedMessage.from_json(b'{"version": 1}')
    with pytest.raises(ValueError):
        QueuedMessage.from_json(b"not json")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_an_envelope_with_no_number_for_a_time_is_refused(constant: bytes) -> None:
    """NaN or Infinity for the arrival (a hand-edited file) is unreadable,
    not a time that breaks ``mailx queue list`` for every message."""
    arrival = b'"arrival": %s' % repr(message().arrival).encode()
    data = message().to_json()
    assert arrival in data
    with pytest.raises(ValueError, match="where a number belongs"):
        QueuedMessage.from_json(data.replace(arrival, b'"arrival": ' + constant))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempts", b"1e400"),
        ("arrival", b"1e400"),
        ("arrival", b"1" + b"0" * 400),
        ("next_attempt", b"1e300"),
        ("arrival", b"-5"),
    ],
)
def test_an_envelope_with_a_number_out_of_range_is_refused(
    field: str, value: bytes
) -> None:
    """A number too large for a float, or a time out of any range: the
    envelope is unreadable, not a message never tried or a listing that
    fails."""
    data = message().to_json()
    start = data.index(b'"%s": ' % field.encode()) + len(field) + 4
    end = min(i for i in (data.find(b",", start), data.find(b"}", start)) if i > 0)
    with pytest.raises(ValueError):
        QueuedMessage.from_json(data[:start] + value + data[end:])


def test_newer_envelope_version_is_refused() -> None:
    """An envelope written by a newer mailx is not misread."""
    data = message().to_json().replace(b'"version": 1', b'"version": 99')
    with pytest.raises(ValueError):
        QueuedMessage.from_json(data)


def test_absent_notify_means_failure_and_delay() -> None:
    """Without NOTIFY a recipient gets failure and delay reports only."""
    recipient = QueuedRecipient(Address("bob", "example.com"))
    assert recipient.wants("FAILURE")
    assert recipient.wants("DELAY")
    assert not recipient.wants("SUCCESS")


class Middle(random.Random):
    def random(self) -> float:
        return 0.5


def test_interval_doubles_then_stays_at_the_maximum() -> None:
    """The wait equals the time queued, between min_retry and max_retry."""
    rng = Middle()
    assert POLICY.retry_interval(0, rng) == 300
    assert POLICY.retry_interval(1000, rng) == 1000
    assert POLICY.retry_interval(100_000, rng) == 3600


@given(age=st.floats(min_value=0, max_value=10**7), seed=st.integers())
def test_jittered_interval_stays_within_bounds(age: float, seed: int) -> None:
    """Whatever the jitter, the wait is within min_retry and max_retry."""
    wait = POLICY.retry_interval(age, random.Random(seed))
    assert 300 <= wait <= 3600


def test_next_attempt_never_passes_the_expiry() -> None:
    """The last retry is scheduled at the expiry, not after it."""
    late = POLICY.next_attempt(message(), 86000, Middle())
    assert late == 86400


def test_next_attempt_stops_at_the_delay_warning() -> None:
    """While a warning is owed, an attempt is scheduled at its time."""
    policy = RetryPolicy(300, 3600, 86400, delay_warning=1000)
    assert policy.next_attempt(message(), 900, Middle()) == 1000
    warned = message()
    warned.delay_warned = True
    assert policy.next_attempt(warned, 900, Middle()) == 1800


def test_expiry_is_inclusive() -> None:
    """A message is expired at exactly its lifetime, not a moment before."""
    assert not POLICY.is_expired(0, 86399.999)
    assert POLICY.is_expired(0, 86400)


def test_schedule_gives_due_messages_in_time_order() -> None:
    """Due messages come out earliest first; later ones wait."""
    schedule = Schedule()
    schedule.put("B", 20)
    schedule.put("A", 10)
    schedule.put("C", 99)
    assert schedule.earliest() == 10
    assert [schedule.pop_due(50), schedule.pop_due(50), schedule.pop_due(50)] == [
        "A",
        "B",
        None,
    ]


def test_schedule_moves_held_and_removed_messages_out() -> None:
    """A rescheduled, held or removed message is not given at its old time."""
    schedule = Schedule()
    schedule.put("A", 10)
    schedule.put("B", 10)
    schedule.put("C", 10)
    schedule.put("A", 30)
    schedule.put("B", 10, hold=True)
    schedule.remove("C")
    assert schedule.pop_due(20) is None
    assert schedule.pop_due(30) == "A"
    assert len(schedule) == 2
    assert schedule.is_held("B")
