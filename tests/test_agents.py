"""
The agents' program and wire format (mailx.agents), run in this process
over real pipes: what they write into the Maildirs and the spool, and what
they answer.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailx import durable
from mailx.agents import (
    Handler,
    WireError,
    decode_answer,
    decode_submissions,
    encode_answer,
    encode_submission,
    error_of,
    maildir_batch,
    maildir_jobs,
    maildir_parts,
    os_error,
    serve,
    spool_handler,
)
from mailx.spool import SpoolStore
from tests.test_spool import CONTENT
from tests.test_spool_files import new_message, store_one

submissions = st.lists(
    st.tuples(st.integers(0, 2**64 - 1), st.lists(st.binary(max_size=300), max_size=5)),
    max_size=4,
)


@given(submissions, st.data())
def test_whole_submissions_are_read_and_a_partial_one_waits(
    sent: list[tuple[int, list[bytes]]], data: st.DataObject
) -> None:
    """Any cut of the stream gives the whole submissions before it, in order."""
    stream = b"".join(encode_submission(number, parts) for number, parts in sent)
    cut = data.draw(st.integers(0, len(stream)))
    got, used = decode_submissions(bytearray(stream[:cut]))
    assert got == sent[: len(got)]
    assert stream[:used] == b"".join(
        encode_submission(number, parts) for number, parts in got
    )
    rest, more = decode_submissions(bytearray(stream[used:]))
    assert got + rest == sent
    assert used + more == len(stream)


def test_a_submission_whose_length_does_not_match_its_parts_is_refused() -> None:
    whole = encode_submission(1, [b"/m", b"abc"])
    # The length field says one octet more than the parts take.
    longer = (int.from_bytes(whole[:8], "big") + 1).to_bytes(8, "big")
    with pytest.raises(WireError, match="longer than its parts"):
        decode_submissions(longer + whole[8:] + b"\0")
    shorter = (int.from_bytes(whole[:8], "big") - 1).to_bytes(8, "big")
    with pytest.raises(WireError, match="cut short"):
        decode_submissions(shorter + whole[8:-1])


def test_answers_and_errors_go_through() -> None:
    error = OSError(errno.ENOSPC, "No space left")
    line = encode_answer(5, {"errors": [None, error_of(error)]})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    number, answer = decode_answer(line.rstrip(b"\n"))
    assert number == 5
    back = os_error(answer["errors"][1])
    assert (back.errno, back.strerror) == (errno.ENOSPC, "No space left")


@pytest.mark.parametrize(
    "answer",
    [
        {"result": None},
        {"result": True},
        {"result": False},
        {"result": [5, "Input/output error", None]},
        {"failed": [28, "No space left on device", "/q/free/A"]},
    ],
)
def test_every_answer_reads_back_as_written(answer: dict[str, Any]) -> None:
    """The usual answers, written without json.dumps, are the same JSON."""
    line = encode_answer(2**40, answer)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_answer(line) == (2**40, {"id": 2**40, **answer})
    assert json.loads(line) == json.loads(json.dumps({"id": 2**40, **answer}))


@pytest.mark.parametrize(
    "line",
    [b"", b"nonsense", b"[]", b'{"id": "1"}', b'{"id": true}', b'{"errors": []}'],
)
def test_an_answer_that_is_not_one_is_refused(line: bytes) -> None:
    with pytest.raises(WireError):
        decode_answer(line)


@pytest.mark.parametrize("value", [None, [1], ["x", "y"], "text", {}])
def test_an_error_that_is_not_one_is_refused(value: Any) -> None:
    with pytest.raises(WireError):
        os_error(value)


def run_agent(handler: Handler, stream: bytes) -> list[dict[str, Any]]:
    """Feed ``stream`` to ``serve`` over real pipes; its answers, "id" and all."""
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
        serve(handler, into_read, out_write)
        writer.join(10)
    finally:
        os.close(into_read)
        os.close(out_write)
        reader.join(10)
        os.close(out_read)
    return [decode_answer(line)[1] for line in bytes(answers).splitlines()]


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
    os.close(descriptor)


def new_files(maildir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((maildir / "new").iterdir())]


def test_the_maildir_agent_writes_each_job_and_answers_in_order(
    tmp_path: Path,
) -> None:
    alice = tmp_path / "alice"
    blocked = tmp_path / "file"
    blocked.write_text("a file where a Maildir's parent should be")
    big = os.urandom(3 * 1024 * 1024)  # more than the pipe holds
    odd = tmp_path / os.fsdecode(b"caf\xe9")  # a path that is not UTF-8
    stream = (
        encode_submission(1, maildir_parts([(str(alice), b"one\r\n")]))
        + encode_submission(
            2, maildir_parts([(str(blocked / "bob"), b"two"), (str(alice), big)])
        )
        + encode_submission(3, maildir_parts([(str(odd), b"three")]))
    )
    answers = run_agent(maildir_batch, stream)
    assert [answer["id"] for answer in answers] == [1, 2, 3]
    assert answers[0]["errors"] == [None]
    refused, written = answers[1]["errors"]
    assert os_error(refused).errno in (errno.EEXIST, errno.ENOTDIR)
    # The mail log names the path that failed, as it did without the agent.
    assert str(blocked) in str(os_error(refused))
    assert written is None
    assert answers[2]["errors"] == [None]
    assert sorted(new_files(alice)) == sorted([b"one\r\n", big])
    assert new_files(odd) == [b"three"]
    assert list((alice / "tmp").iterdir()) == []


def test_copies_of_one_message_carry_its_body_once(tmp_path: Path) -> None:
    """Three Maildirs, one body: sent once, written into each after its field."""
    body = os.urandom(100_000)
    jobs = [
        (str(tmp_path / name), (f"Delivered-To: {name}\n".encode(), body))
        for name in ("a", "b", "c")
    ]
    parts = maildir_parts(jobs)
    assert sum(len(part) for part in parts) < len(body) + 1000
    answers = run_agent(maildir_batch, encode_submission(1, parts))
    assert answers == [{"id": 1, "errors": [None, None, None]}]
    for name in ("a", "b", "c"):
        assert new_files(tmp_path / name) == [f"Delivered-To: {name}\n".encode() + body]


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20).filter(lambda p: "\0" not in p),
            st.lists(st.sampled_from([b"", b"head\n", b"body" * 10]), max_size=3),
        ),
        max_size=4,
    )
)
def test_maildir_jobs_go_through_the_wire_as_they_were(
    jobs: list[tuple[str, list[bytes]]],
) -> None:
    sent = [(path, tuple(pieces)) for path, pieces in jobs]
    assert maildir_jobs(maildir_parts(sent)) == sent


def test_an_agent_ends_quietly_when_the_server_is_gone(tmp_path: Path) -> None:
    into_read, into_write = os.pipe()
    out_read, out_write = os.pipe()
    os.close(out_read)  # nobody reads the answers
    maildir = str(tmp_path / "m")
    os.write(into_write, encode_submission(1, maildir_parts([(maildir, b"x")])))
    os.close(into_write)
    try:
        serve(maildir_batch, into_read, out_write)  # EPIPE: no exception
    finally:
        os.close(into_read)
        os.close(out_write)
    # The copy itself was written before the answer failed.
    assert new_files(tmp_path / "m") == [b"x"]


def store_parts(message_id: str, content: bytes = CONTENT) -> list[bytes]:
    message = new_message(message_id, content)
    return [b"store", message_id.encode(), message.to_json(), content]


def test_the_spool_agent_stores_and_removes_as_the_store_does(
    tmp_path: Path,
) -> None:
    """
    The agent's files are the ones ``SpoolStore`` writes itself: read back
    by a store of the server's, a removed file reused, a deleted one gone.
    """
    server_side = SpoolStore(str(tmp_path))
    server_side.prepare()
    store_one(server_side, "OLD")
    store_one(server_side, "DELETED")
    store_one(server_side, "KEPT")
    stream = b"".join(
        encode_submission(number, parts)
        for number, parts in enumerate(
            [
                [b"remove", b"OLD", b"1"],
                [b"remove", b"DELETED", b"0"],
                [b"remove", b"NEVER", b"1"],
            ]
        )
    )
    answers = run_agent(spool_handler(str(tmp_path)), stream)
    assert [answer["result"] for answer in answers] == [True, True, False]
    assert sorted(os.listdir(tmp_path / "free")) == ["OLD"]
    inode = os.stat(tmp_path / "free" / "OLD").st_ino

    # A new agent finds the file kept for reuse and writes over it.
    answers = run_agent(
        spool_handler(str(tmp_path)), encode_submission(9, store_parts("NEW"))
    )
    assert answers == [{"id": 9, "result": None}]
    assert os.stat(tmp_path / "message" / "NEW").st_ino == inode
    assert server_side.load_with_content("NEW") == (new_message("NEW"), CONTENT)
    assert server_side.ids() == ["KEPT", "NEW"]


def test_the_spool_agent_reports_a_change_that_failed(tmp_path: Path) -> None:
    """A directory where the new message's file would go fails that change only."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    (tmp_path / "free" / "A").mkdir()
    stream = encode_submission(1, store_parts("A")) + encode_submission(
        2, store_parts("B")
    )
    answers = run_agent(spool_handler(str(tmp_path)), stream)
    assert isinstance(os_error(answers[0]["result"]), OSError)
    assert answers[1] == {"id": 2, "result": None}
    assert store.ids() == ["B"]


def test_the_spool_agent_reports_a_batch_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync that commits a batch fails: every change of it is reported."""
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "B")
    handler = spool_handler(str(tmp_path))

    def failing(*_: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durable, "sync_directories", failing)
    stream = encode_submission(1, store_parts("A")) + encode_submission(
        2, [b"remove", b"B", b"1"]
    )
    answers = run_agent(handler, stream)
    assert [os_error(answer["failed"]).errno for answer in answers] == [
        errno.EIO,
        errno.EIO,
    ]


@pytest.mark.parametrize(
    "parts",
    [
        [b"store", b"A", b"{}"],
        [b"rename", b"A", b"1"],
        [b"store", b"B", new_message("A").to_json(), CONTENT],
        [b"store", b"../A", new_message("A").to_json(), CONTENT],
        [b"store", b"A", new_message("AB").to_json(), CONTENT],
        [b"remove", b"A", b"1", b"0", b"extra"],
        [b"remove", b"A"],
    ],
)
def test_the_spool_agent_refuses_what_is_not_a_change(
    tmp_path: Path, parts: list[bytes]
) -> None:
    SpoolStore(str(tmp_path)).prepare()
    handler = spool_handler(str(tmp_path))
    with pytest.raises((WireError, ValueError)):
        handler([(1, parts)])


@pytest.mark.parametrize(
    ("parts", "left"),
    [
        ([b"remove", b"R", b"1", b"0"], ["R"]),
        ([b"remove", b"R", b"1", b"1"], []),
        # From a server that does not say: looked for, as before.
        ([b"remove", b"R", b"1"], []),
    ],
)
def test_a_removal_says_whether_to_look_for_leftovers(
    tmp_path: Path, parts: list[bytes], left: list[str]
) -> None:
    store = SpoolStore(str(tmp_path))
    store.prepare()
    store_one(store, "R")
    store.rewrite(new_message("R"))
    handler = spool_handler(str(tmp_path))
    assert handler([(1, parts)]) == [{"result": True}]
    assert os.listdir(tmp_path / "message") == []
    assert os.listdir(tmp_path / "envelope") == left
