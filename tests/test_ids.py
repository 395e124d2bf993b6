"""Queue ids: unique, in arrival order, and naming the process that made them."""

from __future__ import annotations

import os

from mailx.ids import _ALPHABET, _encode, new_message_id


def decoded(digits: str) -> int:
    number = 0
    for digit in digits:
        number = number * len(_ALPHABET) + _ALPHABET.index(digit)
    return number


def pid_of(message_id: str) -> int:
    return decoded(message_id[11:]) >> 20


def test_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_message_id(1_800_000_000.0 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 20 for i in ids)
    assert {pid_of(i) for i in ids} == {os.getpid()}


def test_a_forked_process_puts_its_own_pid_in_its_ids() -> None:
    """After a fork the child's ids carry the child's pid, not the parent's."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child only
        try:
            os.write(write_end, new_message_id(1_800_000_000.0).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_id = pipe.read().decode()
    os.waitpid(child, 0)
    assert pid_of(child_id) == child
    assert pid_of(new_message_id()) == os.getpid()


def test_digits_are_the_number_in_base_30() -> None:
    """Each width writes the number's base-30 digits, most significant first,
    padded with the alphabet's zero."""
    for width in (1, 2, 9, 11):
        numbers = (0, 1, 29, 30, 899, 900, 30**width - 1, 12345678)
        for number in (n for n in numbers if n < 30**width):
            digits = _encode(number, width)
            assert len(digits) == width
            assert decoded(digits) == number
    assert _encode(31, 3) == "011"
