"""
The queue's model, without I/O: what the spool keeps of each message, how it is
written to disk, when the next delivery attempt happens, and which message is
due next.

Theory of operation.  A queued message is its content (kept apart, never read
here) and a ``QueuedMessage``: the reverse path, each forward path with its own
``RecipientState``, the DSN parameters, and the scheduling facts (arrival,
attempts, next attempt, hold).  ``RetryPolicy`` turns those facts into the next
attempt time; ``Schedule`` keeps, for every message, only the little the
scheduler needs (its next attempt time and hold flag) so 100,000 queued
messages cost a few megabytes.
"""

from __future__ import annotations

import enum
import heapq
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailx.address import Address
from mailx.envelope import Body, ClientInfo, Envelope, Recipient, Route
from mailx.replies import Reply

# Bump when the on-disk envelope changes shape; readers refuse newer versions.
ENVELOPE_VERSION = 1


class RecipientState(enum.Enum):
    """Where one forward path of a queued message stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


class MessageKind(enum.Enum):
    """What a queued message is, which decides who hears of its failure."""

    # Mail accepted from a client.
    MESSAGE = "message"
    # A delivery status notification mailx wrote (reverse path <>).
    DSN = "dsn"
    # A failed DSN reported to bounce_copy_to; its own failure is only logged.
    COPY = "copy"


@dataclass
class QueuedRecipient:
    """One forward path of a queued message and its delivery state."""

    address: Address
    route: Route = Route.RELAY
    # RFC 3461 section 4.1 and 4.2: NOTIFY and ORCPT as the client gave them.
    notify: frozenset[str] | None = None
    orcpt: str | None = None
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    # The last reply for this recipient, from the next hop or from mailx.
    reply: Reply | None = None
    next_hop: str = ""
    last_attempt: float | None = None
    # Set when the queue lifetime ran out while the recipient was pending.
    expired: bool = False

    def wants(self, notify_type: str) -> bool:
        """Whether the sender asked for a DSN of this type (RFC 3461 4.1)."""
        if self.notify is None:
            # RFC 3461 section 4.1: without NOTIFY an MTA acts as if
            # NOTIFY=FAILURE,DELAY had been given (one of the two choices).
            return notify_type in ("FAILURE", "DELAY")
        return notify_type in self.notify


@dataclass
class QueuedMessage:
    """The envelope of a queued message as the spool keeps it on disk."""

    message_id: str
    reverse_path: Address | None
    recipients: list[QueuedRecipient]
    arrival: float
    size: int
    next_attempt: float
    kind: MessageKind = MessageKind.MESSAGE
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    # RFC 3461 section 4.3 and 4.4.
    ret: str | None = None
    envid: str | None = None
    client_address: str | None = None
    client_helo: str | None = None
    attempts: int = 0
    last_attempt: float | None = None
    hold: bool = False
    delay_warned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_envelope(
        cls, message_id: str, envelope: Envelope, size: int, now: float
    ) -> QueuedMessage:
        """The record for a message the server has just accepted."""
        client = envelope.client
        return cls(
            message_id=message_id,
            reverse_path=envelope.reverse_path,
            recipients=[
                QueuedRecipient(r.address, r.route, r.notify, r.orcpt)
                for r in envelope.recipients
            ],
            arrival=envelope.received_at or now,
            size=size,
            next_attempt=now,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
            client_address=client.address if client else None,
            client_helo=client.helo if client else None,
        )

    def to_envelope(self, recipients: list[QueuedRecipient]) -> Envelope:
        """An ``Envelope`` for a delivery attempt to some of the recipients."""
        client = None
        if self.client_address is not None:
            client = ClientInfo(self.client_address, 0, helo=self.client_helo)
        return Envelope(
            reverse_path=self.reverse_path,
            recipients=[
                Recipient(r.address, r.route, r.notify, r.orcpt) for r in recipients
            ],
            body=self.body,
            smtputf8=self.smtputf8,
            declared_size=self.size,
            ret=self.ret,
            envid=self.envid,
            client=client,
            message_id=self.message_id,
            received_at=self.arrival,
        )

    def in_state(self, state: RecipientState) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state is state]

    @property
    def pending(self) -> list[QueuedRecipient]:
        return self.in_state(RecipientState.PENDING)

    def pending_by_domain(self) -> dict[str, list[QueuedRecipient]]:
        """Pending recipients grouped by domain, compared case-folded."""
        groups: dict[str, list[QueuedRecipient]] = {}
        for recipient in self.pending:
            groups.setdefault(recipient.address.domain_key, []).append(recipient)
        return groups

    def last_reply(self) -> Reply | None:
        """The most recent reply among pending recipients, for ``queue list``."""
        replied = [r for r in self.pending if r.reply is not None]
        if not replied:
            return None
        latest = max(replied, key=lambda r: r.last_attempt or 0.0)
        return latest.reply

    def to_json(self) -> bytes:
        # In the order _encode_message lists the fields: json.dumps's own
        # encoder, not one made for sort_keys on every call (issue 7).
        return json.dumps(_encode_message(self)).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueuedMessage:
        """Parse an envelope file; raise ``ValueError`` if it is not one."""
        try:
            return _decode_message(
                json.loads(data, parse_constant=_no_constant, parse_float=_finite)
            )
        except (KeyError, TypeError, AttributeError, OverflowError) as error:
            raise ValueError(f"malformed envelope: {error!r}") from error


def _no_constant(name: str) -> object:
    """NaN and Infinity are no time or size: the envelope is unreadable."""
    raise ValueError(f"malformed envelope: {name} where a number belongs")


# Seconds since the epoch a time in an envelope may have: up to 2514.
_LATEST = float(2**34)


def _time(value: Any) -> float:
    """A time in an envelope, or ValueError: one out of range (edited by
    hand) would never come, or break ``mailx queue list``."""
    when = float(value)
    if not 0.0 <= when < _LATEST:
        raise ValueError(f"malformed envelope: {value!r} is no time")
    return when


def _optional_time(value: Any) -> float | None:
    return None if value is None else _time(value)


def _finite(text: str) -> float:
    """A number too large for a float (1e400) is no time either."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"malformed envelope: {text} where a number belongs")
    return value


def _encode_address(address: Address | None) -> list[str] | None:
    if address is None:
        return None
    return [address.local_part, address.domain]


def _decode_address(value: Any) -> Address | None:
    if value is None:
        return None
    local_part, domain = value
    return Address(str(local_part), str(domain))


def _encode_reply(reply: Reply | None) -> list[Any] | None:
    if reply is None:
        return None
    return [reply.code, reply.enhanced, reply.text]


def _decode_reply(value: Any) -> Reply | None:
    if value is None:
        return None
    code, enhanced, text = value
    return Reply(int(code), str(enhanced), str(text))


def _encode_message(message: QueuedMessage) -> dict[str, Any]:
    return {
        "version": ENVELOPE_VERSION,
        "message_id": message.message_id,
        "reverse_path": _encode_address(message.reverse_path),
        "recipients": [_encode_recipient(r) for r in message.recipients],
        "arrival": message.arrival,
        "size": message.size,
        "next_attempt": message.next_attempt,
        "kind": message.kind.value,
        "body": message.body.value,
        "smtputf8": message.smtputf8,
        "ret": message.ret,
        "envid": message.envid,
        "client_address": message.client_address,
        "client_helo": message.client_helo,
        "attempts": message.attempts,
        "last_attempt": message.last_attempt,
        "hold": message.hold,
        "delay_warned": message.delay_warned,
        "extra": message.extra,
    }


def _encode_recipient(recipient: QueuedRecipient) -> dict[str, Any]:
    notify = None if recipient.notify is None else sorted(recipient.notify)
    return {
        "address": _encode_address(recipient.address),
        "route": recipient.route.value,
        "notify": notify,
        "orcpt": recipient.orcpt,
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "reply": _encode_reply(recipient.reply),
        "next_hop": recipient.next_hop,
        "last_attempt": recipient.last_attempt,
        "expired": recipient.expired,
    }


def _decode_recipient(value: dict[str, Any]) -> QueuedRecipient:
    address = _decode_address(value["address"])
    if address is None:
        raise ValueError("a forward path cannot be null")
    notify = value["notify"]
    return QueuedRecipient(
        address=address,
        route=Route(value["route"]),
        notify=None if notify is None else frozenset(notify),
        orcpt=value["orcpt"],
        state=RecipientState(value["state"]),
        attempts=int(value["attempts"]),
        reply=_decode_reply(value["reply"]),
        next_hop=str(value["next_hop"]),
        last_attempt=_optional_time(value["last_attempt"]),
        expired=bool(value["expired"]),
    )


def _decode_message(value: dict[str, Any]) -> QueuedMessage:
    if value["version"] > ENVELOPE_VERSION:
        raise ValueError(f"envelope version {value['version']} is newer than mailx")
    return QueuedMessage(
        message_id=str(value["message_id"]),
        reverse_path=_decode_address(value["reverse_path"]),
        recipients=[_decode_recipient(r) for r in value["recipients"]],
        arrival=_time(value["arrival"]),
        size=int(value["size"]),
        next_attempt=_time(value["next_attempt"]),
        kind=MessageKind(value["kind"]),
        body=Body(value["body"]),
        smtputf8=bool(value["smtputf8"]),
        ret=value["ret"],
        envid=value["envid"],
        client_address=value["client_address"],
        client_helo=value["client_helo"],
        attempts=int(value["attempts"]),
        last_attempt=_optional_time(value["last_attempt"]),
        hold=bool(value["hold"]),
        delay_warned=bool(value["delay_warned"]),
        extra=dict(value.get("extra", {})),
    )


# A retry interval varies by up to this fraction either way, so messages that
# arrived together spread out instead of retrying in lockstep.
JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a message again, when to warn and when to give up."""

    min_retry: float
    max_retry: float
    lifetime: float
    # 0 switches the delay warning off.
    delay_warning: float

    def expires_at(self, arrival: float) -> float:
        return arrival + self.lifetime

    def is_expired(self, arrival: float, now: float) -> bool:
        # RFC 5321 section 4.5.4.1: give up after the queue lifetime.
        return now >= self.expires_at(arrival)

    def warning_due(self, message: QueuedMessage, now: float) -> bool:
        """Whether a delay warning should go out for ``message`` now."""
        if self.delay_warning <= 0 or message.delay_warned:
            return False
        return now >= message.arrival + self.delay_warning

    def retry_interval(self, age: float, rng: random.Random) -> float:
        """
        The wait before the next attempt: as long as the message has been
        queued, so waits double from ``min_retry`` up to ``max_retry``, then
        spread by the jitter and kept within those bounds.
        """
        base = min(max(age, self.min_retry), self.max_retry)
        spread = 1.0 + JITTER * (2.0 * rng.random() - 1.0)
        return min(max(base * spread, self.min_retry), self.max_retry)

    def next_attempt(
        self, message: QueuedMessage, now: float, rng: random.Random
    ) -> float:
        """
        The time of the next attempt after one at ``now``; never later than
        the expiry, nor than the delay warning while it is still owed.
        """
        wanted = now + self.retry_interval(now - message.arrival, rng)
        wanted = min(wanted, self.expires_at(message.arrival))
        if self.delay_warning > 0 and not message.delay_warned:
            warn_at = message.arrival + self.delay_warning
            if warn_at > now:
                wanted = min(wanted, warn_at)
        return wanted


@dataclass
class _Slot:
    """What the scheduler keeps in memory per queued message."""

    next_attempt: float
    hold: bool


class Schedule:
    """
    Every queued message's next attempt time, and which are due.

    A heap orders (time, message id) pairs; a pair whose time no longer matches
    the message's slot is stale and skipped when it reaches the top, which
    keeps rescheduling at O(log n).
    """

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._slots

    def ids(self) -> Iterator[str]:
        return iter(list(self._slots))

    def put(self, message_id: str, next_attempt: float, hold: bool = False) -> None:
        """Add a message, or move it to a new time and hold state."""
        self._slots[message_id] = _Slot(next_attempt, hold)
        if not hold:
            heapq.heappush(self._heap, (next_attempt, message_id))

    def remove(self, message_id: str) -> None:
        self._slots.pop(message_id, None)

    def is_held(self, message_id: str) -> bool:
        slot = self._slots.get(message_id)
        return slot is not None and slot.hold

    def next_attempt(self, message_id: str) -> float | None:
        slot = self._slots.get(message_id)
        return None if slot is None else slot.next_attempt

    def _is_current(self, entry: tuple[float, str]) -> bool:
        when, message_id = entry
        slot = self._slots.get(message_id)
        return slot is not None and not slot.hold and slot.next_attempt == when

    def earliest(self) -> float | None:
        """The time of the next due attempt, or None if nothing is scheduled."""
        while self._heap and not self._is_current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        """Take the id of a message due at ``now`` off the heap, if any."""
        when = self.earliest()
        if when is None or when > now:
            return None
        _, message_id = heapq.heappop(self._heap)
        return message_id
