"""
The Maildir delivery agent's program and wire format (mailx.deliveryagent),
run in this process over real pipes: what it writes into the Maildirs and
what it answers.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailx.deliveryagent import (
    WireError,
    decode_answer,
    decode_submissions,
    encode_answer,
    encode_submission,
    serve,
)

paths = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    min_size=1,
    max_size=40,
)
jobs = st.lists(st.tuples(paths, st.binary(max_size=300)), max_size=4)
submissions = st.lists(st.tuples(st.integers(0, 2**64 - 1), jobs), max_size=4)


@given(submissions, st.data())
def test_whole_submissions_are_read_and_a_partial_one_waits(
    sent: list[tuple[int, list[tuple[str, bytes]]]], data: st.DataObject
) -> None:
    """Any cut of the stream gives the whole submissions before it, in order."""
    stream = b"".join(encode_submission(number, jobs) for number, jobs in sent)
    cut = data.draw(st.integers(0, len(stream)))
    got, used = decode_submissions(bytearray(stream[:cut]))
    assert got == sent[: len(got)]
    assert stream[:used] == b"".join(
        encode_submission(number, jobs) for number, jobs in got
    )
    rest, more = decode_submissions(bytearray(stream[used:]))
    assert got + rest == sent
    assert used + more == len(stream)


def test_a_path_that_is_not_utf8_goes_through_unchanged() -> None:
    path = os.fsdecode(b"/var/mail/caf\xe9/new")
    got, _ = decode_submissions(encode_submission(7, [(path, b"x")]))
    assert got == [(7, [(path, b"x")])]


def test_a_submission_whose_length_does_not_match_its_jobs_is_refused() -> None:
    whole = encode_submission(1, [("/m", b"abc")])
    # The length field says one octet more than the jobs take.
    longer = (int.from_bytes(whole[:4], "big") + 1).to_bytes(4, "big")
    with pytest.raises(WireError, match="longer than its jobs"):
        decode_submissions(longer + whole[4:] + b"\0")
    shorter = (int.from_bytes(whole[:4], "big") - 1).to_bytes(4, "big")
    with pytest.raises(WireError, match="cut short"):
        decode_submissions(shorter + whole[4:-1])


def test_answers_carry_each_jobs_error() -> None:
    line = encode_answer(5, ["/m/new/1", OSError(errno.ENOSPC, "No space left")])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    number, errors = decode_answer(line.rstrip(b"\n"))
    assert number == 5
    assert errors[0] is None
    assert isinstance(errors[1], OSError)
    assert (errors[1].errno, errors[1].strerror) == (errno.ENOSPC, "No space left")


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"nonsense",
        b"[]",
        b'{"id": 1}',
        b'{"id": "1", "errors": []}',
        b'{"id": 1, "errors": [[1]]}',
        b'{"id": 1, "errors": [["x", "y"]]}',
    ],
)
def test_an_answer_that_is_not_one_is_refused(line: bytes) -> None:
    with pytest.raises(WireError):
        decode_answer(line)


def run_agent(stream: bytes) -> list[bytes]:
    """Feed ``stream`` to ``serve`` over real pipes; its answer lines."""
    into_read, into_write = os.pipe()
    out_read, out_write = os.pipe()
    answers = bytearray()

    def collect() -> None:
        while chunk := os.read(out_read, 65536):
            answers.extend(chunk)

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        writer = threading.Thread(target=lambda: _write_all(into_write, stream))
        writer.start()
        serve(into_read, out_write)
        writer.join(10)
    finally:
        os.close(into_read)
        os.close(out_write)
        reader.join(10)
        os.close(out_read)
    return bytes(answers).splitlines()


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
    os.close(descriptor)


def new_files(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


def test_serve_writes_each_job_and_answers_each_submission_in_order(
    tmp_path: Path,
) -> None:
    alice = tmp_path / "alice"
    blocked = tmp_path / "file"
    blocked.write_text("a file where a Maildir's parent should be")
    big = os.urandom(3 * 1024 * 1024)  # more than the pipe holds
    stream = (
        encode_submission(1, [(str(alice), b"one\r\n")])
        + encode_submission(2, [(str(blocked / "bob"), b"two"), (str(alice), big)])
        + encode_submission(3, [])
    )
    answers = [decode_answer(line) for line in run_agent(stream)]
    assert [number for number, _ in answers] == [1, 2, 3]
    assert answers[0][1] == [None]
    refused, written = answers[1][1]
    assert isinstance(refused, OSError)
    assert refused.errno in (errno.EEXIST, errno.ENOTDIR) and refused.strerror
    assert written is None
    assert answers[2][1] == []
    assert sorted(new_files(alice)) == sorted([b"one\r\n", big])
    assert list((alice / "tmp").iterdir()) == []


def test_serve_ends_quietly_when_the_server_is_gone(tmp_path: Path) -> None:
    into_read, into_write = os.pipe()
    out_read, out_write = os.pipe()
    os.close(out_read)  # nobody reads the answers
    os.write(into_write, encode_submission(1, [(str(tmp_path / "m"), b"x")]))
    os.close(into_write)
    try:
        serve(into_read, out_write)  # EPIPE on the answer: no exception
    finally:
        os.close(into_read)
        os.close(out_write)
    # The copy itself was written before the answer failed.
    assert new_files(tmp_path / "m") == [b"x"]
