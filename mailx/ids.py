"""Queue ids: short, unique on this host, sortable by arrival time."""

from __future__ import annotations

import itertools
import os
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"
_counter = itertools.count()
# The process id, asked of the kernel once a process rather than once an id.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _encode(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def new_message_id(now: float | None = None) -> str:
    """A queue id: microseconds since the epoch, the pid and a counter."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    tail = (_pid << 20) | (next(_counter) & 0xFFFFF)
    return _encode(micros, 11) + _encode(tail, 9)
