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


# Every two-digit number, so that an id takes half as many divisions.
_PAIRS = [high + low for high in _ALPHABET for low in _ALPHABET]


def _encode(number: int, width: int) -> str:
    """``number`` in ``width`` digits of ``_ALPHABET``, most significant first."""
    chunks = []
    if width % 2:
        number, digit = divmod(number, len(_ALPHABET))
        chunks.append(_ALPHABET[digit])
    for _ in range(width // 2):
        number, pair = divmod(number, len(_PAIRS))
        chunks.append(_PAIRS[pair])
    return "".join(reversed(chunks))


def new_message_id(now: float | None = None) -> str:
    """A queue id: microseconds since the epoch, the pid and a counter."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    tail = (_pid << 20) | (next(_counter) & 0xFFFFF)
    return _encode(micros, 11) + _encode(tail, 9)
